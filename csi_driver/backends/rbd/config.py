"""Ceph RBD backend settings."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Literal

from ..base import BackendConfig


def _monitors(value: object) -> list[str]:
    if isinstance(value, str):
        value = [m.strip() for m in value.split(",") if m.strip()]
    if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
        raise ValueError("must be a list of monitor addresses such as 10.0.0.1:6789")
    return value


def _path(value: object) -> str:
    if not isinstance(value, str) or not os.path.isabs(value):
        raise ValueError("must be an absolute path")
    return value


def _prefix(value: object) -> str:
    # A name part that `rbd` and librbd take as is: no pool/namespace/snapshot separators.
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        raise ValueError("must be 1-64 characters of A-Z a-z 0-9 . _ -")
    return value


def _positive(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError("must be a whole number, 1 or more")
    return value


@dataclass(kw_only=True)
class RbdConfig(BackendConfig):
    pool: str
    # Where the cluster is: monitor addresses, or a ceph.conf (one of the two).
    monitors: list[str] = field(default_factory=list, metadata={"convert": _monitors})
    cephConf: str = field(default="", metadata={"convert": _path})
    radosNamespace: str = ""
    # Object map by default: without it a purge removes every object an image could have (10 GiB:
    # 2,560 removes, ~1 image/s here; with it ~10/s, bounded by the deletes), and changed-block
    # tracking needs fast-diff. rbd-nbd and rbd-fuse map these, krbd since kernel 5.3; older
    # krbd nodes need imageFeatures: layering (ceph-csi's default).
    imageFeatures: str = "layering,exclusive-lock,object-map,fast-diff"
    # Image names are <prefix><id>, as ceph-csi's volumeNamePrefix/snapshotNamePrefix. Keep them
    # stable: volumes made under another prefix are no longer found. The trash purger touches
    # only images with these prefixes that also carry Berth's record.
    volumeNamePrefix: str = field(default="csi-vol-", metadata={"convert": _prefix})
    snapshotNamePrefix: str = field(default="csi-snap-", metadata={"convert": _prefix})
    fsType: Literal["ext4", "xfs"] = "ext4"
    mounter: Literal["krbd", "nbd", "fuse"] = "krbd"
    # Clone chains longer than this are flattened, so reads never walk a deep ancestry.
    maxCloneDepth: int = field(default=8, metadata={"convert": _positive})
    # Bound on every cluster call; librados would otherwise wait 300 s for dead monitors.
    timeoutSeconds: int = field(default=10, metadata={"convert": _positive})
    # Optional credentials for the RPCs that carry no secrets (ListVolumes, GetCapacity,
    # ControllerGetVolume); request secrets userID/userKey always win.
    userID: str = ""
    userKeyFile: str = field(default="", metadata={"convert": _path})
    # Node: where rbd-fuse exposes images and helper files live.
    nodeStateDir: str = field(default="/var/lib/berth/rbd", metadata={"convert": _path})

    def __post_init__(self) -> None:
        if bool(self.monitors) == bool(self.cephConf):
            raise ValueError("set exactly one of monitors and cephConf")
        vol, snap = self.volumeNamePrefix, self.snapshotNamePrefix
        if vol.startswith(snap) or snap.startswith(vol):
            # else a listing of one kind would take in images of the other
            raise ValueError("volumeNamePrefix and snapshotNamePrefix must not start one another")
