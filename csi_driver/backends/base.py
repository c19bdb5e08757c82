"""The backend interface: what a storage system must provide, in plain Python types.

Backends never see protobuf. The services check CSI arguments, hold the in-flight locks, apply
capacity and topology rules, and call these methods with validated dataclasses.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class AccessMode(enum.IntEnum):
    # Values equal csi.v1.VolumeCapability.AccessMode.Mode so the services can convert directly.
    SINGLE_NODE_WRITER = 1
    SINGLE_NODE_READER_ONLY = 2
    MULTI_NODE_READER_ONLY = 3
    MULTI_NODE_SINGLE_WRITER = 4
    MULTI_NODE_MULTI_WRITER = 5
    SINGLE_NODE_SINGLE_WRITER = 6
    SINGLE_NODE_MULTI_WRITER = 7


SINGLE_NODE_MODES = frozenset(
    {
        AccessMode.SINGLE_NODE_WRITER,
        AccessMode.SINGLE_NODE_READER_ONLY,
        AccessMode.SINGLE_NODE_SINGLE_WRITER,
        AccessMode.SINGLE_NODE_MULTI_WRITER,
    }
)


@dataclass(frozen=True, slots=True)
class Capability:
    """One requested volume capability."""

    block: bool
    access_mode: AccessMode
    fs_type: str = ""
    mount_flags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Features:
    """What a backend can do; the services advertise and enforce from this."""

    access_modes: frozenset[AccessMode]
    block: bool = False
    # Volumes live on the node that created them (topology segment = that node).
    node_local: bool = False
    # StorageClass parameters the backend understands (besides the common ones).
    parameters: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class VolumeRequest:
    name: str
    size: int
    capabilities: tuple[Capability, ...]
    parameters: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Volume:
    local_id: str
    name: str
    size: int
    parameters: Mapping[str, str] = field(default_factory=dict)
    context: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Capacity:
    available: int
    maximum_volume_size: int | None = None
    minimum_volume_size: int | None = None


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What every backend may need to know about where it runs."""

    node_id: str
    driver_name: str

    @property
    def topology_key(self) -> str:
        return f"topology.{self.driver_name}/node"


class BackendConfig(BaseModel):
    """Base of every backend's config model: unknown keys are errors, not silent typos."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: str


class Backend(ABC):
    """One configured storage system. Subclasses set `type_name`, `Config` and `features`."""

    type_name: ClassVar[str]
    Config: ClassVar[type[BackendConfig]]
    features: Features
    default_volume_size: int = 1 << 30

    def __init__(self, name: str, config: BackendConfig, node: NodeInfo) -> None:
        self.name = name
        self.node = node

    # -- identity -------------------------------------------------------------------------
    @abstractmethod
    def probe(self) -> None:
        """Raise a CsiError (usually Unavailable) when the backend cannot serve requests."""

    # -- controller -----------------------------------------------------------------------
    @abstractmethod
    def create_volume(self, request: VolumeRequest) -> Volume:
        """Create the volume, or return the one an earlier call with the same name made."""

    @abstractmethod
    def delete_volume(self, local_id: str) -> None:
        """Delete the volume; a volume that does not exist is success."""

    @abstractmethod
    def get_volume(self, local_id: str) -> Volume | None: ...

    @abstractmethod
    def list_volumes(self) -> Iterable[Volume]: ...

    @abstractmethod
    def capacity(self, parameters: Mapping[str, str]) -> Capacity: ...

    # -- node -----------------------------------------------------------------------------
    @abstractmethod
    def stage(
        self, local_id: str, staging_path: str, capability: Capability, context: Mapping[str, str]
    ) -> None:
        """Make the volume available at `staging_path` (idempotent)."""

    @abstractmethod
    def unstage(self, local_id: str, staging_path: str) -> None:
        """Undo `stage` (idempotent); nothing of the volume may stay attached afterwards."""

    def owns_mount(self, local_id: str, path: str) -> bool:
        """Whether the mount at `path` shows this volume; backends that can tell override this."""
        return True
