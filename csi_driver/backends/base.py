"""The backend interface: what a storage system must provide, in plain Python types.

Backends never see protobuf. The services check CSI arguments, hold the in-flight locks, apply
capacity and topology rules, and call these methods with validated dataclasses.
"""

from __future__ import annotations

import enum
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from .. import errors
from ..capability import SINGLE_NODE_MODES, AccessMode, Capability
from ..ids import NODE_ID_RE

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
    # SnapshotMetadata: block_map tells which ranges of a snapshot hold data or changed.
    changed_blocks: bool = False


@dataclass(frozen=True, slots=True)
class Source:
    """What a new volume starts from: a snapshot or another volume of the same backend."""

    kind: str  # "snapshot" | "volume"
    local_id: str


# A topology segment set: {key: value}, e.g. {"topology.kubernetes.io/zone": "zone-a"}.
Segments = Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Provisioner:
    """What external-provisioner says about the claim (its --extra-create-metadata), typed:
    backends never see the csi.storage.k8s.io/* parameters themselves."""

    pvc_name: str = ""
    pvc_namespace: str = ""
    pv_name: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class VolumeRequest:
    name: str
    size: int
    capabilities: tuple[Capability, ...]
    # The backend's own StorageClass parameters (the services took out theirs and the
    # provisioner's), checked against Features.parameters.
    parameters: Mapping[str, str]
    secrets: Secrets = field(repr=False)
    source: Source | None = None
    mutable_parameters: Mapping[str, str] = field(default_factory=dict)
    limit: int = 0  # capacity_range.limit_bytes; 0 = none
    provisioner: Provisioner = Provisioner()
    # The request's accessibility requirements; the service has checked that the backend's
    # fixed segments (if any) satisfy `requisite`. A backend that places volumes (a zone per
    # volume) picks from these and reports the choice in Volume.topology.
    requisite: tuple[Segments, ...] = ()
    preferred: tuple[Segments, ...] = ()

    @property
    def block(self) -> bool:
        """Raw block, not mounted (the service refuses a request asking for both)."""
        return any(c.block for c in self.capabilities)


@dataclass(frozen=True, slots=True, kw_only=True)
class VolumeUpdate:
    """ControllerExpandVolume (size) or ControllerModifyVolume (mutable_parameters)."""

    local_id: str
    secrets: Secrets = field(repr=False)
    size: int = 0  # grow to at least this many bytes; 0 = no change
    mutable_parameters: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Query:
    """Which volumes or snapshots to list: every one, or those matching each field set."""

    secrets: Secrets = field(repr=False)
    local_id: str = ""
    source_volume: str = ""  # snapshots of this volume
    group: str = ""  # snapshots of this group snapshot
    # Whether Volume.condition is wanted: a backend that asks its storage for it may skip that
    # when the caller only needs to know that the volume exists.
    condition: bool = True

    def wants(self, local_id: str, source_volume: str = "", group: str = "") -> bool:
        return ((not self.local_id or local_id == self.local_id)
                and (not self.source_volume or source_volume == self.source_volume)
                and (not self.group or group == self.group))


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotRequest:
    name: str
    source_volume: str  # local ID
    parameters: Mapping[str, str]
    secrets: Secrets = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupSnapshotRequest:
    name: str
    source_volumes: tuple[str, ...]  # local IDs
    parameters: Mapping[str, str]
    secrets: Secrets = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockQuery:
    """SnapshotMetadata: the ranges of `snapshot` that hold data or, with `base`, those that
    differ from that earlier snapshot of the same volume (the service has checked that both
    exist and share a volume)."""

    snapshot: str  # local ID
    base: str = ""  # local ID; "" asks for allocation
    start: int = 0  # ranges ending at or before this offset may be left out
    secrets: Secrets = field(repr=False)


@dataclass(frozen=True, slots=True)
class BlockMap:
    capacity: int  # bytes: the target snapshot's volume size
    # (offset, length) in ascending order, none overlapping, computed as they are consumed.
    ranges: Iterable[tuple[int, int]]
    block_size: int = 0  # > 0: every range is this long (FIXED_LENGTH); 0: any length


@dataclass(frozen=True, slots=True, kw_only=True)
class StageRequest:
    """NodeStageVolume, checked: the path is the CO's own directory, nothing foreign is mounted
    there, and the volume is not staged there already."""

    local_id: str
    staging_path: str
    capability: Capability
    context: Mapping[str, str]  # volume_context, as CreateVolume returned it
    publish_context: Mapping[str, str]  # what attach returned (empty without attach)
    secrets: Secrets = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeExpandRequest:
    local_id: str
    volume_path: str
    staging_path: str  # "" when the CO did not give one
    required: int  # bytes; 0: whatever the storage now holds
    secrets: Secrets = field(repr=False)


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
    # Nodes it is published to (backends that attach fill this).
    published: tuple[Attachment, ...] = ()
    # Where it is reachable, when the backend places each volume itself; empty: wherever the
    # backend's own segments say (Backend.segments).
    topology: tuple[Segments, ...] = ()


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
    # It serves the Node service (--mode all|node): start() then registers the node with
    # backends that attach, so their controller can tell the node exists.
    serves_node: bool = True
    # The node's own topology segments (--topology key=value), e.g. its zone.
    segments: Mapping[str, str] = field(default_factory=dict)

    @property
    def topology_key(self) -> str:
        return f"topology.{self.driver_name}/node"


def _count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError("must be a whole number, 0 or more")
    return value


# A Kubernetes label key: an optional DNS-subdomain prefix and '/', then a name of at most 63.
_LABEL_KEY = re.compile(r"^([a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?/)?"
                        r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")


def _segments(value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and _LABEL_KEY.fullmatch(k) and isinstance(v, str)
            and NODE_ID_RE.fullmatch(v) for k, v in value.items()):
        raise ValueError("must map label keys (e.g. topology.kubernetes.io/zone) to values of "
                         "1-63 letters, digits, '.', '-' or '_'")
    return value


@dataclass(kw_only=True)
class BackendConfig:
    """Base of every backend's config section: a dataclass loaded by csi_driver.schema, so
    unknown keys are errors rather than silent typos."""

    type: str
    # Segments the backend's volumes are reachable from (a zone, a rack); empty: everywhere.
    topology: dict[str, str] = field(default_factory=dict, metadata={"convert": _segments})
    # For a backend that attaches: at most this many of its volumes on one node (0: no limit).
    maxVolumesPerNode: int = field(default=0, metadata={"convert": _count})


C = TypeVar("C", bound=BackendConfig)


class Backend(ABC, Generic[C]):
    """One configured storage system. Subclasses set `type_name`, `Config` and `features`,
    and name their config type: `class MyBackend(Backend[MyConfig])`.

    A controller part (volumes, snapshots, attach) and a node part (stage and what follows);
    the services call the node part only on nodes and the controller part only in the
    controller, except start() and probe(), which both call."""

    type_name: ClassVar[str]
    Config: ClassVar[type[BackendConfig]]
    features: ClassVar[Features]
    default_volume_size: int = 1 << 30

    def __init__(self, name: str, config: C, node: NodeInfo) -> None:
        self.name = name
        self.config = config
        self.node = node
        # Where every volume of this backend is reachable from (Volume.topology may narrow
        # it per volume): the config's segments, plus this node for node-local storage.
        self.segments: Segments = {
            **config.topology,
            **({node.topology_key: node.node_id} if self.features.node_local else {})}

    @property
    def topology_keys(self) -> frozenset[str]:
        """The keys NodeGetInfo reports for this backend: those of its fixed segments, and
        for a backend that places each volume (a zone per volume) the keys it places by."""
        return frozenset(self.segments)

    def node_segments(self) -> Segments:
        """Segments of this node the backend can learn itself (its zone, from a cloud's
        metadata service); the node's --topology wins."""
        return {}

    # -- both sides ---------------------------------------------------------------------
    def start(self) -> None:
        """The one start-up hook: the driver calls it before the backend's first use, and
        again until it succeeds (raise a CsiError, usually Unavailable, to be retried)."""

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
    def list_volumes(self, query: Query) -> Iterable[Volume]:
        """The volumes matching `query` (query.local_id: that one, or none)."""

    @abstractmethod
    def capacity(self, parameters: Mapping[str, str]) -> Capacity: ...

    def capability_problem(self, capability: Capability, parameters: Mapping[str, str]
                           ) -> str | None:
        """Why a volume made with `parameters` cannot serve `capability` when the backend as a
        whole can (a layout without raw block, say); None when it can."""
        return None

    # -- node -----------------------------------------------------------------------------
    @abstractmethod
    def stage(self, request: StageRequest) -> None:
        """Make the volume available at `staging_path` (see StageRequest for what is checked)."""

    @abstractmethod
    def unstage(self, local_id: str, staging_path: str) -> None:
        """Undo `stage` (idempotent); nothing of the volume may stay attached afterwards."""

    def restage_problem(self, secrets: Secrets) -> str | None:
        """Why NodePublish could not stage a dead staging mount again with its own request's
        secrets (it carries no node-stage secret); None when it can."""
        return None

    def owns_mount(self, local_id: str, path: str | None) -> bool:
        """Whether the mount at `path` shows this volume; with None, whether the node can tell
        that the volume exists at all (it has no controller credentials, so a backend that
        cannot tell says True and lets the mount table decide)."""
        return True

    # -- optional features: the services only call these when `features` says so ---------
    def _unsupported(self, what: str) -> errors.Unimplemented:
        return errors.Unimplemented(f"backend {self.name!r} ({self.type_name}) has no {what}")

    def update_volume(self, update: VolumeUpdate) -> tuple[int, bool]:
        """Grow to `update.size` (Features.expansion) and/or record new mutable parameters
        (Features.mutable_parameters); returns (size, whether the node must finish a growth)."""
        raise self._unsupported("expansion or mutable parameters")

    def create_snapshot(self, request: SnapshotRequest) -> Snapshot:
        raise self._unsupported("snapshots")

    def delete_snapshot(self, local_id: str, *, secrets: Secrets) -> None:
        raise self._unsupported("snapshots")

    def list_snapshots(self, query: Query) -> Iterable[Snapshot]:
        raise self._unsupported("snapshots")

    def block_map(self, query: BlockQuery) -> BlockMap:
        """Allocated or changed ranges of a snapshot (Features.changed_blocks); raise
        FailedPrecondition for snapshots whose changes cannot be told (the client then takes
        a full backup, as the spec has it)."""
        raise errors.FailedPrecondition(
            f"backend {self.name!r} ({self.type_name}) cannot tell which blocks of a snapshot "
            f"hold data or changed; take a full backup instead")

    def node_expand(self, request: NodeExpandRequest) -> int:
        """Grow what the node sees (device, filesystem) to at least `required` bytes; returns
        the new size in bytes."""
        raise self._unsupported("expansion")

    def node_condition(self, local_id: str, volume_path: str) -> Condition:
        return Condition(abnormal=False, message="")

    def node_usage(self, local_id: str, volume_path: str) -> tuple[int, int] | None:
        """(capacity, used) bytes when the backend knows them better than statfs does (a
        CephFS quota); None: statfs's figures."""
        return None

    def create_group_snapshot(self, request: GroupSnapshotRequest) -> GroupSnapshot:
        raise self._unsupported("group snapshots")

    def delete_group_snapshot(self, local_id: str, *, secrets: Secrets) -> None:
        raise self._unsupported("group snapshots")

    def get_group_snapshot(self, local_id: str, *, secrets: Secrets
                           ) -> GroupSnapshot | None:
        raise self._unsupported("group snapshots")

    # -- attach: the services call these only when `features.attach` --------------------
    # The service decides who may attach (one node for a single-node mode, one writer for
    # MULTI_NODE_SINGLE_WRITER, the same capability again is idempotent, the node's limit);
    # the backend records, and lists them in Volume.published.
    def attach(self, local_id: str, attachment: Attachment, *, secrets: Secrets
               ) -> Mapping[str, str]:
        """Record (and make) the attachment; the publish_context the node will be given."""
        raise self._unsupported("attach step")

    def detach(self, local_id: str, node_id: str, *, secrets: Secrets) -> None:
        """Undo attach for `node_id` (every node when empty); nothing to undo is fine."""
        raise self._unsupported("attach step")

    def node_known(self, node_id: str, *, secrets: Secrets) -> bool:
        """Whether a node of this driver registered itself here (in start(), on a node)."""
        raise self._unsupported("attach step")
