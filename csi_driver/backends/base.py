"""The backend interface: what a storage system must provide, in plain Python types.

Backends never see protobuf. The services check CSI arguments, hold the in-flight locks, apply
capacity and topology rules, and call these methods with validated dataclasses.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .. import errors
from ..capability import SINGLE_NODE_MODES, AccessMode, Capability

__all__ = ["SINGLE_NODE_MODES", "AccessMode", "Capability"]  # and what follows

# CSI secrets of a request (the sidecars fill them from StorageClass secret references).
Secrets = Mapping[str, str]
NO_SECRETS: Secrets = {}


class Expansion(enum.Enum):
    NONE = "none"
    ONLINE = "online"  # may grow while published
    OFFLINE = "offline"  # grows only while not published


@dataclass(frozen=True, slots=True)
class Features:
    """What a backend can do; the services advertise and enforce from this."""

    access_modes: frozenset[AccessMode]
    block: bool = False
    # Volumes live on the node that created them (topology segment = that node).
    node_local: bool = False
    # StorageClass parameters the backend understands (besides the common ones).
    parameters: frozenset[str] = frozenset()
    # VolumeAttributesClass parameters that ControllerModifyVolume may change.
    mutable_parameters: frozenset[str] = frozenset()
    snapshots: bool = False
    clones: bool = False
    group_snapshots: bool = False
    expansion: Expansion = Expansion.NONE
    # get_volume/list_volumes fill Volume.condition; node_condition answers on the node.
    volume_condition: bool = False
    # ControllerPublish/Unpublish attach volumes to nodes (attachments/attach/detach below).
    attach: bool = False


@dataclass(frozen=True, slots=True)
class Source:
    """What a new volume starts from: a snapshot or another volume of the same backend."""

    kind: str  # "snapshot" | "volume"
    local_id: str


@dataclass(frozen=True, slots=True)
class VolumeRequest:
    name: str
    size: int
    capabilities: tuple[Capability, ...]
    parameters: Mapping[str, str]
    source: Source | None = None
    mutable_parameters: Mapping[str, str] = field(default_factory=dict)
    limit: int = 0  # capacity_range.limit_bytes; 0 = none
    secrets: Secrets = field(default_factory=dict, repr=False)

    @property
    def block(self) -> bool:
        """Raw block, not mounted (the service refuses a request asking for both)."""
        return any(c.block for c in self.capabilities)


@dataclass(frozen=True, slots=True)
class Attachment:
    """A volume published to a node by ControllerPublishVolume."""

    node_id: str
    capability: Capability
    readonly: bool

    def to_record(self) -> dict[str, Any]:
        """What a backend stores for it (beside the node id), as JSON."""
        cap = self.capability
        return {"mode": int(cap.access_mode), "block": cap.block, "fsType": cap.fs_type,
                "flags": list(cap.mount_flags), "readonly": self.readonly}

    @classmethod
    def from_record(cls, node_id: str, data: Mapping[str, Any]) -> Attachment:
        return cls(node_id, Capability(
            block=bool(data.get("block")), access_mode=AccessMode(int(data.get("mode", 1))),
            fs_type=str(data.get("fsType", "")), mount_flags=tuple(data.get("flags", ()))),
            bool(data.get("readonly")))


@dataclass(frozen=True, slots=True)
class Condition:
    abnormal: bool
    message: str


@dataclass(frozen=True, slots=True)
class Volume:
    local_id: str
    name: str
    size: int
    parameters: Mapping[str, str] = field(default_factory=dict)
    context: Mapping[str, str] = field(default_factory=dict)
    source: Source | None = None
    # True: raw block only; False: mount only.
    block: bool = False
    mutable_parameters: Mapping[str, str] = field(default_factory=dict)
    condition: Condition | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    local_id: str
    name: str
    source_volume: str  # local ID of the volume it was taken from
    size: int
    created_at: float  # seconds since the epoch
    ready: bool = True
    group: str = ""  # local ID of the group snapshot it belongs to, if any


@dataclass(frozen=True, slots=True)
class GroupSnapshot:
    local_id: str
    name: str
    snapshots: tuple[Snapshot, ...]
    created_at: float
    ready: bool = True


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
    # This process serves the Controller service (--mode all|controller): only then does a
    # backend run controller-side background work (purges, sweeps of leftover copies).
    controller: bool = True

    @property
    def topology_key(self) -> str:
        return f"topology.{self.driver_name}/node"


@dataclass(kw_only=True)
class BackendConfig:
    """Base of every backend's config section: a dataclass loaded by csi_driver.schema, so
    unknown keys are errors rather than silent typos."""

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
    def delete_volume(self, local_id: str, *, secrets: Secrets) -> None:
        """Delete the volume; a volume that does not exist is success."""

    @abstractmethod
    def get_volume(self, local_id: str, *, secrets: Secrets) -> Volume | None: ...

    @abstractmethod
    def list_volumes(self) -> Iterable[Volume]: ...

    @abstractmethod
    def capacity(self, parameters: Mapping[str, str]) -> Capacity: ...

    # -- node -----------------------------------------------------------------------------
    @abstractmethod
    def stage(self, local_id: str, staging_path: str, capability: Capability,
              context: Mapping[str, str], *, secrets: Secrets) -> None:
        """Make the volume available at `staging_path`. The service has checked that it is not
        staged there already (by owns_mount) and that no other mount is in the way."""

    @abstractmethod
    def unstage(self, local_id: str, staging_path: str) -> None:
        """Undo `stage` (idempotent); nothing of the volume may stay attached afterwards."""

    def known_on_node(self, local_id: str) -> bool:
        """Whether the node can tell that the volume exists (it has no controller credentials,
        so a backend that cannot tell says True and lets the mount table decide)."""
        return True

    def owns_mount(self, local_id: str, path: str) -> bool:
        """Whether the mount at `path` shows this volume; backends that can tell override this."""
        return True

    def capability_problem(self, capability: Capability, parameters: Mapping[str, str]
                           ) -> str | None:
        """Why a volume made with `parameters` cannot serve `capability` when the backend as a
        whole can (a layout without raw block, say); None when it can."""
        return None

    # -- optional features: the services only call these when `features` says so ---------
    def _unsupported(self, what: str) -> errors.Unimplemented:
        return errors.Unimplemented(f"backend {self.name!r} ({self.type_name}) has no {what}")

    def create_snapshot(self, name: str, source_volume: str, parameters: Mapping[str, str],
                        *, secrets: Secrets) -> Snapshot:
        raise self._unsupported("snapshots")

    def delete_snapshot(self, local_id: str, *, secrets: Secrets) -> None:
        raise self._unsupported("snapshots")

    def get_snapshot(self, local_id: str, *, secrets: Secrets) -> Snapshot | None:
        raise self._unsupported("snapshots")

    def list_snapshots(self, *, secrets: Secrets) -> Iterable[Snapshot]:
        raise self._unsupported("snapshots")

    def expand_volume(self, local_id: str, size: int, *, secrets: Secrets
                      ) -> tuple[int, bool]:
        """Grow to `size` bytes; returns (new size, whether the node must finish the job)."""
        raise self._unsupported("expansion")

    def node_expand(self, local_id: str, volume_path: str, staging_path: str, required: int,
                    *, secrets: Secrets) -> int:
        """Grow what the node sees (device, filesystem) to at least `required` bytes (0: to
        whatever the storage now holds); returns the new size in bytes."""
        raise self._unsupported("expansion")

    def node_condition(self, local_id: str, volume_path: str) -> Condition:
        return Condition(abnormal=False, message="")

    def modify_volume(self, local_id: str, mutable_parameters: Mapping[str, str],
                      *, secrets: Secrets) -> None:
        raise self._unsupported("mutable parameters")

    def create_group_snapshot(self, name: str, source_volumes: list[str],
                              parameters: Mapping[str, str], *, secrets: Secrets
                              ) -> GroupSnapshot:
        raise self._unsupported("group snapshots")

    def delete_group_snapshot(self, local_id: str, *, secrets: Secrets) -> None:
        raise self._unsupported("group snapshots")

    def get_group_snapshot(self, local_id: str, *, secrets: Secrets
                           ) -> GroupSnapshot | None:
        raise self._unsupported("group snapshots")

    # -- attach: the services call these only when `features.attach` --------------------
    # The service decides who may attach (one node for a single-node mode, one writer for
    # MULTI_NODE_SINGLE_WRITER, the same capability again is idempotent); the backend records.
    def attachments(self, local_id: str, *, secrets: Secrets) -> list[Attachment]:
        raise self._unsupported("attach step")

    def attach(self, local_id: str, attachment: Attachment, *, secrets: Secrets
               ) -> Mapping[str, str]:
        """Record (and make) the attachment; the publish_context the node will be given."""
        raise self._unsupported("attach step")

    def detach(self, local_id: str, node_id: str, *, secrets: Secrets) -> None:
        """Undo attach for `node_id` (every node when empty); nothing to undo is fine."""
        raise self._unsupported("attach step")

    def node_known(self, node_id: str, *, secrets: Secrets) -> bool:
        """Whether a node of this driver registered itself (register_node) here."""
        raise self._unsupported("attach step")

    def register_node(self, node_id: str) -> None:
        """On the node (NodeGetInfo, which kubelet calls before any attach): say it exists."""
        raise self._unsupported("attach step")
