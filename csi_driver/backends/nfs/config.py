"""NFS backend settings (StorageClass parameters may override the per-volume ones)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from ..base import BackendConfig

NFS_VERSIONS = ("3", "4", "4.0", "4.1", "4.2")
ON_DELETE = ("delete", "retain", "archive")
_MODE_RE = re.compile(r"^0?[0-7]{3,4}$")


def _share(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError("must be the exported path, starting with '/' (e.g. /exports/k8s)")
    return "/" + value.strip("/")


def _options(value: object) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
        raise ValueError("must be a list of mount options such as [hard, nconnect=4]")
    return [o.strip() for opt in value for o in opt.split(",") if o.strip()]


def _version(value: object) -> str:
    text = str(value) if isinstance(value, int | float | str) else ""
    if text not in NFS_VERSIONS:
        raise ValueError(f"must be one of {', '.join(NFS_VERSIONS)}")
    return text


def _absolute(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError("must be an absolute path")
    return "/" + value.strip("/")


def _positive(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError("must be a whole number, 1 or more")
    return value


def parse_mode(value: str) -> int:
    if not _MODE_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not an octal mode such as 0770")
    return int(value, 8)


def _mode(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be an octal mode in quotes, such as '0770'")
    parse_mode(value)
    return value


@dataclass(kw_only=True)
class NfsConfig(BackendConfig):
    server: str
    share: str = field(metadata={"convert": _share})
    # What nodes mount with: vers=<nfsVersion> plus mountOptions (StorageClass mountOptions add).
    nfsVersion: str = field(default="4.1", metadata={"convert": _version})
    mountOptions: list[str] = field(default_factory=list, metadata={"convert": _options})
    # Where each volume lives under the share; ${pvc.metadata.name}, ${pvc.metadata.namespace}
    # and ${pv.metadata.name} come from the provisioner's --extra-create-metadata.
    subDir: str = "${pv.metadata.name}"
    onDelete: Literal["delete", "retain", "archive"] = "delete"
    # Mode of a new volume's directory (as csi-driver-nfs's mountPermissions).
    mountPermissions: str = field(default="0777", metadata={"convert": _mode})
    # The controller's own protocol (libnfs). Only 3: libnfs 4.0's NFSv4 cannot chmod a
    # directory (EISDIR) nor keep one client id across several connections (CLID_INUSE), and
    # the copy pipelines send NFSv3 SETATTRs.
    controllerVersion: Literal[3] = 3
    # Bound on every controller call to the server and on node mounts/unmounts.
    timeoutSeconds: int = field(default=10, metadata={"convert": _positive})
    # How long CreateVolume/CreateSnapshot wait for a copy before answering "in progress".
    copyWaitSeconds: int = field(default=5, metadata={"convert": _positive})
    # directory: a sub-directory per volume (RWX, size not enforced); image: a filesystem image
    # file in it on a loop device on the node (RWO, size enforced, block access possible).
    volumeLayout: Literal["directory", "image"] = "directory"
    fsType: Literal["ext4", "xfs"] = "ext4"  # image layout, when the request names none
    # Node: where image volumes' directories are mounted.
    nodeStateDir: str = field(default="/var/lib/berth/nfs", metadata={"convert": _absolute})
    # A CreateVolume not retried for this long was abandoned (its PVC deleted): its claim on a
    # subDir lapses, and a copy it started (from a snapshot or volume) is reclaimed.
    abandonAfterSeconds: int = field(default=3600, metadata={"convert": _positive})
    # Connections that copy files at once in a snapshot, restore or clone.
    copyWorkers: int = field(default=4, metadata={"convert": _positive})
