"""hostPath backend settings."""

from __future__ import annotations

import os

from pydantic import field_validator

from ...node import filesystems
from ...quantity import parse_bytes
from ..base import BackendConfig


class HostPathConfig(BackendConfig):
    type: str = "hostpath"
    path: str
    # Total bytes this backend may hand out; default: the filesystem's free space.
    capacity: int | None = None
    defaultVolumeSize: int = 1 << 30
    # Mount volumes as plain directories (size not enforced) or filesystem images on loop devices.
    layout: str = "directory"
    fsType: str = "ext4"

    @field_validator("capacity", "defaultVolumeSize", mode="before")
    @classmethod
    def _size(cls, value: int | str | None) -> int | None:
        return None if value is None else parse_bytes(value)

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not os.path.isabs(value):
            raise ValueError("must be an absolute path")
        return os.path.normpath(value)

    @field_validator("layout")
    @classmethod
    def _layout(cls, value: str) -> str:
        if value not in ("directory", "image"):
            raise ValueError("must be 'directory' or 'image'")
        return value

    @field_validator("fsType")
    @classmethod
    def _fs(cls, value: str) -> str:
        if value not in filesystems.SUPPORTED:
            raise ValueError(f"must be one of {', '.join(filesystems.SUPPORTED)}")
        return value
