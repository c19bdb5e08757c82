"""CephFS backend settings."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from ..ceph_config import CephClusterConfig, path

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _name(value: object) -> str:
    # Filesystem, group and pool names reach the mgr as JSON and paths as one component.
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError("must be 1-64 characters of A-Z a-z 0-9 . _ -, not starting with . _ -")
    return value


def _options(value: object) -> list[str]:
    if isinstance(value, str):
        value = [o.strip() for o in value.split(",") if o.strip()]
    if not isinstance(value, list) or not all(
            isinstance(o, str) and o and "," not in o for o in value):
        raise ValueError("must be a list of mount options such as noatime")
    return value


@dataclass(kw_only=True)
class CephfsConfig(CephClusterConfig):
    fsName: str = field(default="cephfs", metadata={"convert": _name})
    # Volumes are subvolumes of this group; it is created at start when it is missing.
    subvolumeGroup: str = field(default="csi", metadata={"convert": _name})
    # Data pool for new volumes' files (a StorageClass `pool` parameter wins); empty: the
    # filesystem's default data pool.
    pool: str = field(default="", metadata={"convert": lambda v: _name(v) if v else ""})
    # Subvolume names are <prefix><id>, snapshot names <snapshotNamePrefix><id>.
    volumeNamePrefix: str = field(default="csi-vol-", metadata={"convert": _name})
    snapshotNamePrefix: str = field(default="csi-snap-", metadata={"convert": _name})
    # Node: the kernel client (production: needs the ceph module) or ceph-fuse (no module).
    mounter: Literal["kernel", "fuse"] = "kernel"
    mountOptions: list[str] = field(default_factory=list, metadata={"convert": _options})
    # Node: keyrings while a mount starts, and what ceph-fuse mounts log.
    nodeStateDir: str = field(default="/var/lib/berth/cephfs", metadata={"convert": path})
