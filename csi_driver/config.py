"""The config file (YAML) turned into validated settings, with errors that name the bad key."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .backends import backend_types
from .backends.base import BackendConfig
from .ids import BACKEND_NAME_RE

DEFAULT_DRIVER_NAME = "berth.csi.dev"
# CSI: at most 63 characters of alphanumerics, '-' and '.', alphanumeric at both ends; lowercase
# because it also prefixes the topology key, which must be a DNS subdomain.
_DRIVER_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
# A topology value: at most 63 characters, alphanumeric at both ends.
NODE_ID_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")


class ConfigError(Exception):
    pass


class _FileModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    driverName: str = DEFAULT_DRIVER_NAME
    maxVolumesPerNode: int = Field(default=0, ge=0)
    backends: dict[str, dict[str, Any]] = Field(min_length=1)

    @field_validator("driverName")
    @classmethod
    def _driver_name(cls, value: str) -> str:
        if not _DRIVER_NAME_RE.match(value):
            raise ValueError(
                "must be at most 63 characters of lowercase letters, digits, '.' and '-', "
                "starting and ending with a letter or digit"
            )
        return value


@dataclass(frozen=True)
class Settings:
    driver_name: str
    max_volumes_per_node: int
    backends: dict[str, BackendConfig]


def _describe(exc: ValidationError, prefix: str) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        lines.append(f"{where or '(top level)'}: {err['msg']}")
    return "; ".join(lines)


def parse_settings(data: Any, source: str = "config") -> Settings:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with a 'backends' key")
    try:
        top = _FileModel.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc, '')}") from None
    types = backend_types()
    backends: dict[str, BackendConfig] = {}
    for name, raw in top.backends.items():
        where = f"backends.{name}"
        if not BACKEND_NAME_RE.match(name):
            raise ConfigError(
                f"{source}: {where}: backend names must be lowercase letters, digits and '-' "
                "(at most 63), because they become part of volume IDs"
            )
        if not isinstance(raw, dict) or "type" not in raw:
            known = ", ".join(sorted(types))
            raise ConfigError(f"{source}: {where}.type: required (one of {known})")
        kind = raw["type"]
        if kind not in types:
            raise ConfigError(
                f"{source}: {where}.type: unknown backend type {kind!r}; "
                f"known: {', '.join(sorted(types))}"
            )
        try:
            backends[name] = types[kind].Config.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(f"{source}: {_describe(exc, where)}") from None
    return Settings(top.driverName, top.maxVolumesPerNode, backends)


def load_settings(path: str | None, data_dir: str) -> Settings:
    """Settings from `path`, or the embedded default: one hostPath backend in `data_dir`."""
    if path is None:
        default = {"backends": {"local": {"type": "hostpath", "path": os.path.abspath(data_dir)}}}
        return parse_settings(default, "built-in default")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_settings(data, path)
