"""The config file (YAML) turned into validated settings, with errors that name the bad key."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from . import schema
from .backends import backend_type, type_names
from .backends.base import BackendConfig
from .ids import BACKEND_NAME_RE

DEFAULT_DRIVER_NAME = "berth.csi.dev"
# CSI: at most 63 characters of alphanumerics, '-' and '.', alphanumeric at both ends; lowercase
# because it also prefixes the topology key, which must be a DNS subdomain.
_DRIVER_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")


class ConfigError(Exception):
    pass


def _driver_name(value: object) -> str:
    if not isinstance(value, str) or not _DRIVER_NAME_RE.fullmatch(value):
        raise ValueError(
            "must be at most 63 characters of lowercase letters, digits, '.' and '-', "
            "starting and ending with a letter or digit"
        )
    return value


def _count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError("must be a whole number, 0 or more")
    return value


def _backends(value: object) -> dict[str, Any]:
    if not isinstance(value, dict) or not value:
        raise ValueError("must map at least one backend name to its settings")
    return value


@dataclass(kw_only=True)
class _File:
    driverName: str = field(default=DEFAULT_DRIVER_NAME, metadata={"convert": _driver_name})
    maxVolumesPerNode: int = field(default=0, metadata={"convert": _count})
    backends: dict[str, Any] = field(metadata={"convert": _backends})


@dataclass(frozen=True)
class Settings:
    driver_name: str
    max_volumes_per_node: int
    backends: dict[str, BackendConfig]


def parse_settings(data: Any, source: str = "config") -> Settings:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with a 'backends' key")
    try:
        top = schema.load(_File, data)
    except schema.SchemaError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    backends: dict[str, BackendConfig] = {}
    for name, raw in top.backends.items():
        where = f"backends.{name}"
        if not isinstance(name, str) or not BACKEND_NAME_RE.fullmatch(name):
            raise ConfigError(
                f"{source}: {where}: backend names must be lowercase letters, digits and '-' "
                "(at most 63), because they become part of volume IDs"
            )
        if not isinstance(raw, dict) or "type" not in raw:
            known = ", ".join(type_names())
            raise ConfigError(f"{source}: {where}.type: required (one of {known})")
        kind = raw["type"]
        kind_class = backend_type(kind) if isinstance(kind, str) else None
        if kind_class is None:
            raise ConfigError(
                f"{source}: {where}.type: unknown backend type {kind!r}; "
                f"known: {', '.join(type_names())}"
            )
        try:
            backends[name] = schema.load(kind_class.Config, raw, where)
        except schema.SchemaError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        if backends[name].maxVolumesPerNode and not kind_class.features.attach:
            raise ConfigError(
                f"{source}: {where}.maxVolumesPerNode: a {kind} backend does not attach volumes "
                "to nodes, so it has no per-node limit; set the top-level maxVolumesPerNode")
    return Settings(top.driverName, top.maxVolumesPerNode, backends)


def load_settings(path: str | None, data_dir: str) -> Settings:
    """Settings from `path`, or the embedded default: one hostPath backend in `data_dir`."""
    if path is None:
        default = {"backends": {"local": {"type": "hostpath", "path": os.path.abspath(data_dir)}}}
        return parse_settings(default, "built-in default")
    import yaml  # only when there is a file to read: it costs memory the default run can skip

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_settings(data, path)
