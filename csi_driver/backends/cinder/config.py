"""Cinder backend settings."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ..base import _LABEL_KEY, BackendConfig

ZONE_KEY = "topology.kubernetes.io/zone"
# Credentials a request may carry as CSI secrets (the keys of a clouds.yaml `auth` section).
AUTH_SECRET_KEYS = frozenset({
    "auth_url", "username", "user_id", "password", "user_domain_name", "user_domain_id",
    "project_name", "project_id", "project_domain_name", "project_domain_id", "domain_name",
    "application_credential_id", "application_credential_name",
    "application_credential_secret", "token", "region_name",
})


def _path(value: object) -> str:
    if not isinstance(value, str) or not os.path.isabs(value):
        raise ValueError("must be an absolute path")
    return value


def _positive(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError("must be a whole number, 1 or more")
    return value


def _zones(value: object) -> list[str]:
    if isinstance(value, str):
        value = [z.strip() for z in value.split(",") if z.strip()]
    if not isinstance(value, list) or not all(
            isinstance(z, str) and re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?",
                                                z) for z in value):
        raise ValueError("must be a list of availability zone names (each a valid label value)")
    return value


def _label_key(value: object) -> str:
    if not isinstance(value, str) or not _LABEL_KEY.fullmatch(value):
        raise ValueError("must be a label key such as topology.kubernetes.io/zone")
    return value


def _nodes(value: object) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, dict)
            and set(v) <= {"ip", "initiator", "host"} and all(isinstance(x, str)
                                                              for x in v.values())
            for k, v in value.items()):
        raise ValueError("must map node IDs to {ip, initiator, host} (strings)")
    return value


@dataclass(kw_only=True)
class CinderConfig(BackendConfig):
    # Where the credentials are: a clouds.yaml and the cloud's name in it. Without a file, every
    # request must carry them as CSI secrets (AUTH_SECRET_KEYS); secrets always win.
    cloudsFile: str = field(default="", metadata={"convert": _path})
    cloud: str = ""
    region: str = ""
    interface: Literal["public", "internal", "admin"] = "public"
    caFile: str = field(default="", metadata={"convert": _path})
    # Zones this backend creates volumes in, the first the default; empty: Cinder's default.
    availabilityZones: list[str] = field(default_factory=list, metadata={"convert": _zones})
    # The node label that carries a node's zone; NodeGetInfo reports it.
    zoneKey: str = field(default=ZONE_KEY, metadata={"convert": _label_key})
    volumeType: str = ""  # Cinder's default type when empty
    # nova: nodes are Nova servers (ControllerPublish attaches through Nova, the node finds the
    # disk under /dev/disk/by-id). cinder: any other node; Cinder attachments with the node's
    # connector, connected by the node itself (rbd connection info; iSCSI/NFS not built yet).
    attach: Literal["nova", "cinder"] = "nova"
    # Bound on each API request (connect and read), and on each wait for a status change.
    timeoutSeconds: int = field(default=10, metadata={"convert": _positive})
    waitSeconds: int = field(default=60, metadata={"convert": _positive})
    # cinder mode: the connector facts of each node (host defaults to the node ID). When set,
    # only these nodes may be published to.
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={"convert": _nodes})
    # Node side.
    fsType: Literal["ext4", "xfs"] = "ext4"
    # nova mode: where the node reads its zone (the controller finds its server by node ID).
    metadataURL: str = "http://169.254.169.254"
    # Where udev links disks by serial (tests point it at a directory of their own links).
    devicesDir: str = field(default="/dev/disk/by-id", metadata={"convert": _path})
    # cinder mode with rbd connection info: how the node maps images, and the key of the cephx
    # user Cinder names (a node-stage secret `userKey` wins).
    rbdMounter: Literal["krbd", "nbd", "fuse"] = "krbd"
    rbdUserKeyFile: str = field(default="", metadata={"convert": _path})
    nodeStateDir: str = field(default="/var/lib/berth/cinder", metadata={"convert": _path})

    def __post_init__(self) -> None:
        if bool(self.cloudsFile) != bool(self.cloud):
            raise ValueError("cloudsFile and cloud go together: set both or neither")
