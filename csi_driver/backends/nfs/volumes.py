"""What a volume is made of on the share: its settings, kind and directory or image."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping

from ... import errors
from ..base import SINGLE_NODE_MODES, Capability
from . import share
from .config import NFS_VERSIONS, ON_DELETE, NfsConfig, parse_mode
from .image import ATTACHED_FILE
from .libnfs import Connection, NfsError

# StorageClass parameters the backend takes (over its config's defaults).
PARAMETERS = frozenset({"subDir", "onDelete", "mountPermissions", "uid", "gid", "mountOptions",
                        "nfsVersion", "volumeLayout"})
IMAGE = "image"
# What ControllerModifyVolume may change: both only shape the node's next mount.
MUTABLE = frozenset({"mountOptions", "nfsVersion"})
# Options the node sets itself (vers from nfsVersion, addr from the server's address).
_OWN_OPTIONS = frozenset({"vers", "nfsvers", "addr"})
_OPTION_RE = re.compile(r"^[A-Za-z0-9_.:/@+-]+(=[A-Za-z0-9_.:/@+-]+)?$")


def settings(c: NfsConfig, parameters: Mapping[str, str]) -> dict[str, str]:
    """Per-volume settings: StorageClass parameters over the backend's defaults."""
    got = {"subDir": c.subDir, "onDelete": c.onDelete, "mountPermissions": c.mountPermissions,
           "nfsVersion": c.nfsVersion, "mountOptions": ",".join(c.mountOptions),
           "uid": "", "gid": "", "volumeLayout": c.volumeLayout}
    got.update({k: v for k, v in parameters.items() if k in PARAMETERS})
    if got["onDelete"] not in ON_DELETE:
        raise errors.InvalidArgument(f"onDelete must be one of {', '.join(ON_DELETE)}")
    try:
        parse_mode(got["mountPermissions"])
    except ValueError as exc:
        raise errors.InvalidArgument(f"mountPermissions: {exc}") from exc
    for key in ("uid", "gid"):
        if got[key] and not got[key].isdigit():
            raise errors.InvalidArgument(f"{key} must be a number, not {got[key]!r}")
    if got["volumeLayout"] not in ("directory", IMAGE):
        raise errors.InvalidArgument("volumeLayout must be directory or image")
    check_version(got["nfsVersion"])
    return got


def check_version(version: str) -> None:
    if version not in NFS_VERSIONS:
        raise errors.InvalidArgument(f"nfsVersion must be one of {', '.join(NFS_VERSIONS)}, "
                                     f"not {version!r}")


def check_mutable(params: Mapping[str, str]) -> None:
    """INVALID_ARGUMENT for a key that cannot change or a value the node could not mount with
    (checked here: a bad option would otherwise surface only at some later NodeStage)."""
    for key, value in params.items():
        if key not in MUTABLE:
            raise errors.InvalidArgument(
                f"parameter {key!r} cannot be modified; mutable: {', '.join(sorted(MUTABLE))}")
        if key == "nfsVersion":
            check_version(value)
            continue
        for option in value.split(","):
            if not _OPTION_RE.fullmatch(option) and option != "":
                raise errors.InvalidArgument(
                    f"mountOptions: {option!r} is not a mount option such as hard or timeo=600")
            if option.split("=")[0] in _OWN_OPTIONS:
                raise errors.InvalidArgument(
                    f"mountOptions: {option!r} is set by the driver (use nfsVersion)")


def layout_problem(layout: str, cap: Capability) -> str | None:
    """Why a volume of `layout` cannot serve `cap`, or None."""
    if layout != IMAGE and cap.block:
        return "block access needs volumeLayout: image (a directory has no device)"
    if layout == IMAGE and cap.access_mode not in SINGLE_NODE_MODES:
        return ("volumeLayout image is mounted by one node at a time (ext4/xfs on a shared "
                "file): ask for a single-node access mode, or use the directory layout")
    return None


def grow_image(conn: Connection, image: str, size: int, create: bool = False) -> None:
    """A sparse image of at least `size` bytes (never shrunk)."""
    flags = os.O_WRONLY | (os.O_CREAT if create else 0)
    with conn.open(image, flags, 0o600) as fh:
        if conn.fstat(fh).size < size:
            conn.ftruncate(fh, size)

def make_directory(conn: Connection, path: str, settings: Mapping[str, str]) -> None:
    """The volume's directory; one that is already there (retained data) is adopted."""
    try:
        conn.mkdir(path, 0o700)
    except NfsError as exc:
        if exc.errno != errno.EEXIST:
            raise
    if settings["uid"] or settings["gid"]:
        st = conn.stat(path)
        conn.lchown(path, int(settings["uid"] or st.uid), int(settings["gid"] or st.gid))
    conn.chmod(path, parse_mode(settings["mountPermissions"]))

def not_attached(conn: Connection, local_id: str, rec: share.VolumeRecord) -> None:
    """An image a node may have mounted cannot be copied whole: the copy would be torn. The
    marker is what nodes before the attach step wrote beside the image."""
    if rec.layout != IMAGE:
        return
    nodes = sorted(share.attachments(conn, local_id))
    if nodes or conn.exists(f"/{rec.sub_dir}/{ATTACHED_FILE}"):
        where = f" to node {nodes[0]!r}" if nodes else ""
        raise errors.FailedPrecondition(
            f"volume {rec.name!r} is an image published{where}; a copy of a mounted "
            "filesystem image would be torn: stop its workload (unpublish it) first")

def same_kind(source: tuple[str, bool], wanted: tuple[str, bool]) -> None:
    """A copy keeps what the source is: a directory, a filesystem image, or raw block."""
    def kind(layout: str, block: bool) -> str:
        return "raw block" if block else "filesystem image" if layout == IMAGE else "directory"

    if source != wanted:
        raise errors.InvalidArgument(
            f"the source is a {kind(*source)} volume; a {kind(*wanted)} volume cannot be "
            "made from it")
