"""Settings every Ceph backend (RBD, CephFS) shares: where the cluster is, how long to wait for
it, and the optional credentials for RPCs that carry no secrets."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .base import BackendConfig


def monitors(value: object) -> list[str]:
    if isinstance(value, str):
        value = [m.strip() for m in value.split(",") if m.strip()]
    if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
        raise ValueError("must be a list of monitor addresses such as 10.0.0.1:6789")
    return value


def path(value: object) -> str:
    if not isinstance(value, str) or not os.path.isabs(value):
        raise ValueError("must be an absolute path")
    return value


def positive(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError("must be a whole number, 1 or more")
    return value


@dataclass(kw_only=True)
class CephClusterConfig(BackendConfig):
    # Where the cluster is: monitor addresses, or a ceph.conf (one of the two).
    monitors: list[str] = field(default_factory=list, metadata={"convert": monitors})
    cephConf: str = field(default="", metadata={"convert": path})
    # Bound on every cluster call; librados would otherwise wait 300 s for dead monitors.
    timeoutSeconds: int = field(default=10, metadata={"convert": positive})
    # Optional credentials for the RPCs that carry no secrets (ListVolumes, GetCapacity,
    # ControllerGetVolume); request secrets userID/userKey always win.
    userID: str = ""
    userKeyFile: str = field(default="", metadata={"convert": path})

    def __post_init__(self) -> None:
        if bool(self.monitors) == bool(self.cephConf):
            raise ValueError("set exactly one of monitors and cephConf")
