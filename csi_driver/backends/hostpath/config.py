"""hostPath backend settings."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from ...quantity import parse_bytes
from ..base import BackendConfig


def _absolute(value: object) -> str:
    if not isinstance(value, str) or not os.path.isabs(value):
        raise ValueError("must be an absolute path")
    return os.path.normpath(value)


def _size(value: object) -> int:
    if not isinstance(value, int | str):
        raise ValueError("must be a size such as 10Gi")
    return parse_bytes(value)


def _optional_size(value: object) -> int | None:
    return None if value is None else _size(value)


@dataclass(kw_only=True)
class HostPathConfig(BackendConfig):
    path: str = field(metadata={"convert": _absolute})
    # Total bytes this backend may hand out; default: the filesystem's free space.
    capacity: int | None = field(default=None, metadata={"convert": _optional_size})
    defaultVolumeSize: int = field(default=1 << 30, metadata={"convert": _size})
    # Mount volumes as plain directories (size not enforced) or filesystem images on loop devices.
    layout: Literal["directory", "image"] = "directory"
    fsType: Literal["ext4", "xfs"] = "ext4"
