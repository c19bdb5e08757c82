"""Ceph RBD backend settings."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from ..ceph_config import CephClusterConfig, path, positive


def _prefix(value: object) -> str:
    # A name part that `rbd` and librbd take as is: no pool/namespace/snapshot separators.
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        raise ValueError("must be 1-64 characters of A-Z a-z 0-9 . _ -")
    return value


@dataclass(kw_only=True)
class RbdConfig(CephClusterConfig):
    pool: str
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
    maxCloneDepth: int = field(default=8, metadata={"convert": positive})
    # Node: where rbd-fuse exposes images and helper files live.
    nodeStateDir: str = field(default="/var/lib/berth/rbd", metadata={"convert": path})

    def __post_init__(self) -> None:
        super().__post_init__()
        vol, snap = self.volumeNamePrefix, self.snapshotNamePrefix
        if vol.startswith(snap) or snap.startswith(vol):
            # else a listing of one kind would take in images of the other
            raise ValueError("volumeNamePrefix and snapshotNamePrefix must not start one another")
