"""Mount state from /proc/self/mountinfo and bind mounts through mount(2).

Calling libc directly instead of exec'ing mount(8) keeps NodePublish in the sub-millisecond range
and gives us errno values to map onto gRPC codes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading
import time
from dataclasses import dataclass

from ..errors import FailedPrecondition, Internal, InvalidArgument, Unavailable

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8  # never follow a symlink a pod may have planted at a path we unmount

# Per-mount-point flags that a bind mount can carry; anything else is filesystem data that a bind
# mount cannot apply, so it is refused instead of being silently ignored.
BIND_FLAGS = {
    "ro": MS_RDONLY, "rw": 0, "nosuid": MS_NOSUID, "suid": 0, "nodev": MS_NODEV, "dev": 0,
    "noexec": MS_NOEXEC, "exec": 0, "noatime": MS_NOATIME, "atime": 0,
    "nodiratime": MS_NODIRATIME, "diratime": 0, "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME, "defaults": 0, "bind": 0,
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


@dataclass(frozen=True, slots=True)
class MountEntry:
    mount_id: int
    device: str  # major:minor
    root: str
    mount_point: str
    options: tuple[str, ...]
    fs_type: str
    source: str

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


MOUNTINFO = "/proc/self/mountinfo"


def _escape(path: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo octal.
    return (path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")
            .replace("\n", "\\012"))


def _unescape(field: str) -> str:
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _parse(line: str) -> MountEntry:
    left, _, right = line.partition(" - ")
    fields = left.split(" ", 6)
    tail = right.split(" ", 2)
    return MountEntry(
        mount_id=int(fields[0]),
        device=fields[2],
        root=_unescape(fields[3]),
        mount_point=_unescape(fields[4]),
        options=tuple(fields[5].split(",")),
        fs_type=tail[0],
        source=_unescape(tail[1]) if len(tail) > 1 else "",
    )


# Filesystems whose server can remove or replace a directory under a mount (ESTALE).
NETWORK_FS = frozenset({"nfs", "nfs4", "ceph", "fuse.ceph-fuse", "cifs", "smb3", "9p"})


def is_network(entry: MountEntry) -> bool:
    return entry.fs_type in NETWORK_FS


def read_mountinfo() -> str:
    """The raw mount table: a cheap substring test on it often makes parsing unnecessary."""
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
        return f.read()


def mount_table(text: str | None = None) -> list[MountEntry]:
    return [_parse(line) for line in (read_mountinfo() if text is None else text).splitlines()]


def entries_naming(text: str, path: str) -> list[MountEntry]:
    """The entries of mountinfo `text` whose line names `path` (as root, mount point or source).

    Only those lines are parsed, so the cost stays flat on nodes with hundreds of mounts.
    """
    needle = f" {_escape(path)} "
    if needle not in text:
        return []
    return [_parse(line) for line in text.splitlines() if needle in line]


def resolve(path: str) -> str:
    """`path` with its parent's symlinks resolved. Only the parent: resolving `path` itself
    would stat the mounted filesystem's root, which blocks for ever on an NFS mount whose
    server is gone."""
    path = os.path.normpath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path) or "."), os.path.basename(path))


def mount_at(path: str, text: str | None = None) -> MountEntry | None:
    """The mount visible at `path` if `path` is a mount point (the top of any stack), else None.

    Pass `text` (read_mountinfo()) to reuse one reading across the checks of an RPC.
    """
    real = resolve(path)
    found = None
    for entry in entries_naming(read_mountinfo() if text is None else text, real):
        if entry.mount_point == real:
            found = entry
    return found


def _call_mount(source: str, target: str, flags: int, fs_type: str | None = None) -> None:
    rc = _libc.mount(source.encode(), target.encode(), fs_type.encode() if fs_type else None,
                     flags, None)
    if rc != 0:
        err = ctypes.get_errno()
        raise Internal(f"mount of {source} on {target} failed: {os.strerror(err)}")


def split_options(mount_flags: tuple[str, ...], read_only: bool) -> tuple[int, list[str]]:
    """Mount options as (per-mount flag bits, filesystem data options)."""
    flags = MS_RDONLY if read_only else 0
    data: list[str] = []
    for flag in mount_flags:
        for word in flag.split(","):
            word = word.strip()
            if word in BIND_FLAGS:
                flags |= BIND_FLAGS[word]
            elif word:
                data.append(word)
    return flags, data


def bind_flags(mount_flags: tuple[str, ...], read_only: bool) -> int:
    flags, data = split_options(mount_flags, read_only)
    if data:
        raise InvalidArgument(
            f"mount option(s) {', '.join(data)} cannot apply to a bind mount; "
            f"supported: {', '.join(sorted(BIND_FLAGS))}"
        )
    return flags


def mount_fs(device: str, target: str, fs_type: str, flags: int, data: list[str]) -> None:
    """Mount the filesystem on `device` at `target`; bad data options give INVALID_ARGUMENT."""
    rc = _libc.mount(device.encode(), target.encode(), fs_type.encode(), flags,
                     ",".join(data).encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        if err == errno.EINVAL and data:
            raise InvalidArgument(
                f"mounting {fs_type} with options {','.join(data)!r} failed: {os.strerror(err)}"
            )
        raise Internal(f"mount of {device} ({fs_type}) on {target} failed: {os.strerror(err)}")


def bind(source: str, target: str, flags: int = 0) -> None:
    """Bind-mount `source` on `target`, then apply per-mount flags (read-only, noexec...)."""
    _call_mount(source, target, MS_BIND)
    if flags:
        try:
            _call_mount("none", target, MS_BIND | MS_REMOUNT | flags)
        except Internal:
            unmount(target)
            raise


def _unmount_all(target: str, given_up: threading.Event | None = None) -> bool:
    did = False
    while True:
        if _libc.umount2(os.fsencode(target), UMOUNT_NOFOLLOW) == 0:
            did = True
            # A call that returns after its caller gave up must not go on to unmount whatever
            # has been mounted at the path since (a re-staged volume, a new publish).
            if given_up is not None and given_up.is_set():
                return did
            continue
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return did
        if err == errno.EBUSY:
            raise FailedPrecondition(f"{target} is still in use and cannot be unmounted")
        raise Internal(f"unmount of {target} failed: {os.strerror(err)}")


def unmount(target: str, wait: float = 10.0, lazy: bool = True) -> bool:
    """Unmount every mount stacked on `target`; False when nothing was mounted there.

    A filesystem whose server is gone (NFS) can block an unmount for ever: after `wait` seconds
    the mounts are detached lazily instead (MNT_DETACH needs nothing from the filesystem), so
    the path is free and the kernel finishes the job whenever it can. With lazy=False (a
    filesystem whose unwritten data must land before anything else uses its device) the caller
    gets UNAVAILABLE instead, and retries.
    """
    from . import bounded  # local: bounded imports errors only, but keep mounts import-light

    given_up = threading.Event()
    try:
        return bounded.call(f"umount:{target}", _unmount_all, target, given_up, timeout=wait)
    except FailedPrecondition:
        # Busy: by a user, or by our own call stuck on a filesystem that no longer answers (or
        # answers ESTALE): only a healthy filesystem's busy mount is the caller's problem.
        try:
            bounded.call(f"probe:{target}", answers, target, timeout=min(wait, 2.0))
        except (Unavailable, OSError):
            if not lazy:
                raise
        else:
            raise
        return _detach_lazily(target)
    except Unavailable:
        given_up.set()
        if not lazy:
            raise Unavailable(f"{target} did not unmount within {wait:.0f}s (its storage does not "
                              "answer); retry once it does") from None
        return _detach_lazily(target)


def _detach_lazily(target: str) -> bool:
    did = False
    while _libc.umount2(os.fsencode(target), MNT_DETACH | UMOUNT_NOFOLLOW) == 0:
        did = True
    return did


def touch_open(path: str) -> None:
    """Open and close `path`: unlike stat, which NFS answers from its attribute cache for up to
    a minute, an open revalidates with the server (close-to-open), so ESTALE shows at once."""
    os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))


def answers(path: str) -> None:
    """Raise unless the filesystem at `path` answers: an open (NFS revalidates, ESTALE shows)
    and a lookup of a name nobody made (no cache can answer it: a FUSE client whose server is
    gone, such as ceph-fuse without its MDS, serves cached opens but blocks here)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    if not is_dir:  # a bind-mounted device node: the open is the whole test
        return
    try:
        os.stat(os.path.join(path, f".berth-probe-{os.getpid()}-{time.monotonic_ns()}"))
    except FileNotFoundError:
        return


def same_object(a: str, b: str) -> bool:
    """Whether two paths show the same directory or device (a bind mount keeps the inode)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def ensure_bind(source: str, target: str, flags: int, make: str = "dir",
                text: str | None = None) -> None:
    """Idempotent bind mount: OK if `target` already shows `source` with the same read-only state.

    `make` says what to create at `target` when it is missing: a directory, or a file (the mount
    point of a block device).
    """
    from ..errors import AlreadyExists  # local import keeps the module's error imports small

    entry = mount_at(target, text)
    if entry is not None:
        if same_object(source, target) and entry.read_only == bool(flags & MS_RDONLY):
            return
        raise AlreadyExists(
            f"{target} is already mounted with something else or with other options; "
            "unpublish it first"
        )
    if not os.path.lexists(target):
        if make == "dir":
            os.mkdir(target, 0o750)
        else:
            with open(target, "x"):
                pass
    bind(source, target, flags)


def daemons_serving(tool: str, mount_point: str) -> list[int]:
    """The pids of `tool` processes (rbd-fuse, ceph-fuse) whose last argument is `mount_point`:
    FUSE daemons serving it, ours or a previous driver's."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")[:-1]
        except OSError:
            continue
        if (argv and os.path.basename(argv[0]) == os.fsencode(tool)
                and argv[-1] == os.fsencode(mount_point)):
            found.append(int(pid))
    return found
