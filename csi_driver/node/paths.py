"""Staging and target paths from the CO, checked before the node service touches them.

The node service runs privileged on every node, so a path in a request is input, not trust: it
must lie beneath the kubelet directory (--kubelet-dir), and no component below that directory may
be a symlink (one could point the mount, or the removal, anywhere on the host). The walk uses
lstat on the parents only; the last component is looked up in the mount table first, because a
stat of a mount point whose NFS server is gone blocks for ever.

What is left: the walk and the later mount(2) are separate steps, so a process able to write
inside the kubelet directory could swap a component between the two. Pods cannot (they see only
their volumes' contents); kubelet and the driver itself are the only writers there.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass

from .. import errors
from . import mounts

NAME_MAX = 255  # bytes per component (ENAMETOOLONG past it)
PATH_MAX = 4096


@dataclass(frozen=True, slots=True)
class KubeletDir:
    given: str  # as configured, normalised
    real: str  # with its own symlinks resolved (it may legitimately be a link, e.g. to /data)

    @classmethod
    def of(cls, path: str) -> KubeletDir:
        given = os.path.normpath(os.path.abspath(path))
        return cls(given, os.path.realpath(given))


def _syntax(path: str, field: str) -> list[str]:
    """The path's components; INVALID_ARGUMENT for what no kubelet would send."""
    if "\0" in path:
        raise errors.InvalidArgument(f"{field} contains a NUL byte")
    raw = os.fsencode(path)
    if len(raw) >= PATH_MAX:
        raise errors.InvalidArgument(f"{field} is {len(raw)} bytes long; the limit is {PATH_MAX}")
    parts = [p for p in path.split("/") if p]
    for part in parts:
        if part in (".", ".."):
            raise errors.InvalidArgument(f"{field} {path!r} must not contain '.' or '..'")
        if len(os.fsencode(part)) > NAME_MAX:
            raise errors.InvalidArgument(
                f"{field} has a component of {len(os.fsencode(part))} bytes "
                f"({part[:32]}...); the limit is {NAME_MAX}")
    return parts


def check(path: str, field: str, root: KubeletDir, lookup: bool = False) -> str:
    """`path` in its canonical form (the kubelet directory's real name, no '//' or trailing '/'),
    after checking that it lies beneath the kubelet directory and that nothing below that
    directory is a symlink. The last component may be missing; its parent must then exist.
    `lookup`: the RPC only looks at a published volume, so a path outside the kubelet directory
    or under a missing parent is NOT_FOUND (nothing can be published there)."""
    outside: type[errors.CsiError] = errors.NotFound if lookup else errors.InvalidArgument
    if not path.startswith("/"):  # kubelet sends absolute paths: this one is not beneath it
        raise outside(f"{field} {path!r} must be an absolute path beneath the kubelet "
                      f"directory {root.given}")
    norm = "/" + "/".join(_syntax(path, field))
    for prefix in (root.given.rstrip("/"), root.real.rstrip("/")):
        if norm.startswith(prefix + "/") and len(norm) > len(prefix) + 1:
            below = norm[len(prefix) + 1:].split("/")
            break
    else:
        raise outside(
            f"{field} {path} is not beneath the kubelet directory {root.given} "
            "(--kubelet-dir): the node only mounts and removes paths kubelet gave it")
    current = root.real
    for part in below[:-1]:
        current = os.path.join(current, part)
        mode = lmode(current, field)
        if mode is None:
            raise (errors.NotFound if lookup else errors.FailedPrecondition)(
                f"{field}: {current} does not exist")
        if not stat.S_ISDIR(mode):
            raise errors.FailedPrecondition(
                f"{field}: {current} is a {_kind(mode)}, not a directory; the node never "
                "follows symlinks in the paths it is given")
    final = os.path.join(current, below[-1])
    if mounts.mount_at(final) is None:  # a mount point is never a symlink; don't stat it
        mode = lmode(final, field)
        if mode is not None and stat.S_ISLNK(mode):
            raise errors.FailedPrecondition(
                f"{field} {final} is a symlink; the node never follows or removes one")
    return final


def _kind(mode: int) -> str:
    return "symlink" if stat.S_ISLNK(mode) else "file" if stat.S_ISREG(mode) else "special file"


def lmode(path: str, field: str = "path") -> int | None:
    """The path's own file type bits (never following a symlink), None when missing."""
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise errors.FailedPrecondition(f"{field}: {path}: {exc.strerror}") from exc


def usable_target(path: str, block: bool) -> None:
    """An existing, unmounted target must be what publish would have made: an empty directory
    (or, for a raw block volume, an empty regular file). Anything else is someone's data."""
    mode = lmode(path)
    if mode is None:
        return
    if block:
        if not stat.S_ISREG(mode):
            raise errors.FailedPrecondition(
                f"target_path {path} exists and is not a regular file; a raw block volume "
                "is published onto an empty file")
        if os.lstat(path).st_size:
            raise errors.FailedPrecondition(
                f"target_path {path} is a file that holds data; refusing to mount over it")
        return
    if not stat.S_ISDIR(mode):
        raise errors.FailedPrecondition(
            f"target_path {path} exists and is not a directory; a mounted volume is published "
            "onto an empty directory")
    try:
        with os.scandir(path) as entries:
            if next(entries, None) is not None:
                raise errors.FailedPrecondition(
                    f"target_path {path} is not empty; refusing to mount over its contents")
    except OSError as exc:
        raise errors.FailedPrecondition(f"target_path {path}: {exc.strerror}") from exc


# Marks the directory or file publish created at a target, so unpublish removes only that.
MADE_BY = "trusted.berth.made-for"


def make_target(path: str, block: bool, volume_id: str) -> None:
    """Create the missing target (an empty file for a raw block volume, else a directory) and
    mark it as ours. The parent must exist: the CO makes it."""
    try:
        if block:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o640))
        else:
            os.mkdir(path, 0o750)
    except FileNotFoundError as exc:
        raise errors.FailedPrecondition(
            f"the directory holding target_path {path} does not exist; the CO creates it"
        ) from exc
    except OSError as exc:
        raise errors.FailedPrecondition(f"cannot create target_path {path}: {exc.strerror}"
                                        ) from exc
    # A filesystem without trusted xattrs: the target is left for kubelet to remove.
    with contextlib.suppress(OSError):
        os.setxattr(path, MADE_BY, volume_id.encode(), follow_symlinks=False)


def remove_own(path: str, volume_id: str) -> bool:
    """Remove what publish made at an unmounted target: the empty directory or empty file it
    marked for this volume, nothing else. True when removed or nothing is there."""
    mode = lmode(path)
    if mode is None:
        return True
    try:
        if os.getxattr(path, MADE_BY, follow_symlinks=False) != volume_id.encode():
            return False
        if stat.S_ISDIR(mode):
            os.rmdir(path)  # fails on a non-empty directory: never ours to empty
        elif stat.S_ISREG(mode) and os.lstat(path).st_size == 0:
            os.unlink(path)
        else:
            return False
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True
