"""CSI Controller service: argument checks, capacity and topology rules, locking, pagination."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import grpc
from google.protobuf.wrappers_pb2 import Int64Value

from .. import errors, ids
from ..backends.base import (
    NO_SECRETS,
    AccessMode,
    Backend,
    Expansion,
    Query,
    Secrets,
    Segments,
    Source,
    Volume,
    VolumeRequest,
    VolumeUpdate,
)
from ..csi import csi_pb2 as pb
from ..csi import csi_pb2_grpc as pb_grpc
from . import capabilities, convert, lookup, pagination, parameters
from .controller_attach import AttachRPCs
from .controller_snapshots import SnapshotRPCs
from .plugin import Plugin

_Cap = pb.ControllerServiceCapability.RPC.Type


def _size_for(capacity_range: pb.CapacityRange, backend: Backend[Any]) -> int:
    required, limit = capacity_range.required_bytes, capacity_range.limit_bytes
    if required < 0 or limit < 0:
        raise errors.InvalidArgument("capacity_range bytes must not be negative")
    if limit and required > limit:
        raise errors.InvalidArgument(
            f"capacity_range.required_bytes ({required}) exceeds limit_bytes ({limit})"
        )
    if required:
        return required
    return min(backend.default_volume_size, limit) if limit else backend.default_volume_size


def _fits(size: int, capacity_range: pb.CapacityRange) -> bool:
    limit = capacity_range.limit_bytes
    return size >= capacity_range.required_bytes and (not limit or size <= limit)


def _source(request: pb.CreateVolumeRequest, backend_name: str, backend: Backend[Any]
            ) -> Source | None:
    if not request.HasField("volume_content_source"):
        return None
    content = request.volume_content_source
    kind = content.WhichOneof("type")
    if kind == "snapshot":
        raw, allowed = content.snapshot.snapshot_id, backend.features.snapshots
    elif kind == "volume":
        raw, allowed = content.volume.volume_id, backend.features.clones
    else:
        raise errors.InvalidArgument("volume_content_source names neither a snapshot nor a volume")
    if not allowed:
        raise errors.InvalidArgument(
            f"backend {backend_name!r} ({backend.type_name}) cannot create volumes from a {kind}"
        )
    parsed = ids.parse(raw)
    if parsed is None:
        raise errors.NotFound(f"source {kind} {raw!r} does not exist")
    if parsed.backend != backend_name:
        raise errors.InvalidArgument(
            f"source {kind} {raw!r} lives in backend {parsed.backend!r}, not {backend_name!r}"
        )
    return Source(kind, parsed.local)


def _source_pb(backend_name: str, source: Source) -> pb.VolumeContentSource:
    full = str(ids.ObjectId(backend_name, source.local_id))
    if source.kind == "snapshot":
        return pb.VolumeContentSource(
            snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=full))
    return pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=full))


def _within(segments: Segments, topology: Segments) -> bool:
    """Whether a volume reachable from `segments` is reachable from `topology` (which names
    every topology key the nodes report, as the CO's requisite topologies do)."""
    return all(topology.get(k) == v for k, v in segments.items())


def _reachable(backend: Backend[Any], requisite: Sequence[Segments]) -> bool:
    """Whether the backend's volumes can satisfy a requisite list (an empty one: anywhere)."""
    return not backend.segments or not requisite or any(
        _within(backend.segments, t) for t in requisite)


def _only(given: Iterable[str], allowed: frozenset[str], what: str) -> None:
    """INVALID_ARGUMENT naming the keys of `given` outside `allowed`, and the allowed ones."""
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise errors.InvalidArgument(
            f"{what}: {', '.join(unknown)}; it accepts: {', '.join(sorted(allowed)) or 'none'}")


def _check_mutable(backend: Backend[Any], mutable: dict[str, str]) -> None:
    """Only the keys the backend lets change: at CreateVolume as at ControllerModifyVolume."""
    _only(mutable, backend.features.mutable_parameters,
          f"parameter(s) that cannot be modified on backend {backend.name!r}")


class ControllerService(SnapshotRPCs, AttachRPCs, pb_grpc.ControllerServicer):
    def __init__(self, driver: Plugin) -> None:
        self.driver = driver

    # -- helpers -------------------------------------------------------------------------
    @staticmethod
    def _topology(backend: Backend[Any], volume: Volume) -> list[pb.Topology]:
        places = volume.topology or ((backend.segments,) if backend.segments else ())
        return [pb.Topology(segments=dict(t)) for t in places]

    def _volume_pb(self, backend_name: str, backend: Backend[Any], volume: Volume
                   ) -> pb.Volume:
        message = pb.Volume(
            volume_id=str(ids.ObjectId(backend_name, volume.local_id)),
            capacity_bytes=volume.size,
            volume_context=dict(volume.context),
            accessible_topology=self._topology(backend, volume),
        )
        if volume.source is not None:
            message.content_source.CopyFrom(_source_pb(backend_name, volume.source))
        return message

    def _existing(self, volume_id: str, *, secrets: Secrets
                  ) -> tuple[str, Backend[Any], Volume]:
        if not volume_id:
            raise errors.InvalidArgument("volume_id is required")
        found = self.driver.backend_for_id(volume_id)
        volume = lookup.volume(found[1], found[0].local, secrets=secrets) if found else None
        if found is None or volume is None:
            raise errors.NotFound(f"volume {volume_id!r} does not exist")
        return found[0].backend, found[1], volume

    # -- RPCs ----------------------------------------------------------------------------
    def CreateVolume(self, request: pb.CreateVolumeRequest, context: grpc.ServicerContext
                     ) -> pb.CreateVolumeResponse:
        if not request.name:
            raise errors.InvalidArgument("name is required")
        caps = capabilities.parse_all(request.volume_capabilities)
        if len({c.block for c in caps}) > 1:
            raise errors.InvalidArgument("a volume is either raw block or mounted, not both")
        backend_name, backend = self.driver.backend_for_parameters(request.parameters)
        own = parameters.own(request.parameters)
        capabilities.require_supported(backend, caps, own)
        source = _source(request, backend_name, backend)
        _only(own, backend.features.parameters,
              f"unknown parameter(s) for backend {backend_name!r} ({backend.type_name})")
        mutable = dict(request.mutable_parameters)
        _check_mutable(backend, mutable)
        size = _size_for(request.capacity_range, backend)
        need = request.accessibility_requirements
        requisite = [dict(t.segments) for t in need.requisite]
        if not _reachable(backend, requisite):
            where = ", ".join(f"{k}={v}" for k, v in sorted(backend.segments.items()))
            raise errors.ResourceExhausted(
                f"backend {backend_name!r} keeps its volumes at {where}, which the "
                "accessibility requirements exclude"
            )
        # The source is held too: deleting it while it is being copied must wait (ABORTED).
        source_key = (f"id:{backend_name}:{source.local_id}" if source is not None else "")
        with self.driver.locks.hold(f"name:{request.name}", source_key):
            volume = backend.create_volume(VolumeRequest(
                name=request.name, size=size, capabilities=tuple(caps), parameters=own,
                source=source, mutable_parameters=mutable,
                limit=request.capacity_range.limit_bytes, secrets=dict(request.secrets),
                provisioner=parameters.provisioner(request.parameters),
                requisite=tuple(requisite),
                preferred=tuple(dict(t.segments) for t in need.preferred),
            ))
        if volume.name != request.name:
            raise errors.Internal("backend returned a volume of another name")
        # A volume made before backends were given their own parameters only recorded all.
        if (not _fits(volume.size, request.capacity_range)
                or parameters.own(volume.parameters) != own or volume.source != source
                or any(c.block != volume.block for c in caps)):
            raise errors.AlreadyExists(
                f"volume {request.name!r} already exists with another size, parameters, source "
                "or access type than requested"
            )
        return pb.CreateVolumeResponse(volume=self._volume_pb(backend_name, backend, volume))

    def DeleteVolume(self, request: pb.DeleteVolumeRequest, context: grpc.ServicerContext
                     ) -> pb.DeleteVolumeResponse:
        if not request.volume_id:
            raise errors.InvalidArgument("volume_id is required")
        found = self.driver.backend_for_id(request.volume_id)
        if found is None:  # not one of ours: nothing to delete
            return pb.DeleteVolumeResponse()
        parsed, backend = found
        with self.driver.locks.hold(f"id:{request.volume_id}"):
            backend.delete_volume(parsed.local, secrets=request.secrets)
        return pb.DeleteVolumeResponse()

    def ValidateVolumeCapabilities(
        self, request: pb.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.ValidateVolumeCapabilitiesResponse:
        if not request.volume_id:
            raise errors.InvalidArgument("volume_id is required")
        caps = capabilities.parse_all(request.volume_capabilities)
        _, backend, volume = self._existing(request.volume_id, secrets=request.secrets)
        reasons = [r for r in (capabilities.unsupported(
            backend, c, parameters.own(volume.parameters)) for c in caps) if r]
        if any(c.block != volume.block for c in caps):
            reasons.append(f"the volume is {'raw block' if volume.block else 'a filesystem'}")
        if request.parameters and (parameters.own(request.parameters)
                                   != parameters.own(volume.parameters)):
            reasons.append("parameters differ from the ones the volume was created with")
        if reasons:
            return pb.ValidateVolumeCapabilitiesResponse(message="; ".join(reasons))
        return pb.ValidateVolumeCapabilitiesResponse(
            confirmed=pb.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context=request.volume_context,
                volume_capabilities=request.volume_capabilities,
                parameters=request.parameters,
            )
        )

    @staticmethod
    def _status(backend: Backend[Any], volume: Volume) -> pb.ListVolumesResponse.VolumeStatus:
        status = pb.ListVolumesResponse.VolumeStatus()
        if backend.features.volume_condition and volume.condition is not None:
            status.volume_condition.CopyFrom(convert.condition_pb(volume.condition))
        # LIST_VOLUMES_PUBLISHED_NODES: what the external-attacher reconciles against.
        status.published_node_ids.extend(sorted(a.node_id for a in volume.published))
        return status

    def ListVolumes(self, request: pb.ListVolumesRequest, context: grpc.ServicerContext
                    ) -> pb.ListVolumesResponse:
        rows = sorted(
            ((str(ids.ObjectId(name, v.local_id)), (name, backend, v))
             for name, backend in self.driver.backends.items()
             for v in self.driver.ready(backend).list_volumes(Query(secrets=NO_SECRETS))),
            key=lambda row: row[0],
        )
        entries, token = pagination.page(rows, request.max_entries, request.starting_token)
        return pb.ListVolumesResponse(
            entries=[
                pb.ListVolumesResponse.Entry(volume=self._volume_pb(name, backend, volume),
                                             status=self._status(backend, volume))
                for name, backend, volume in entries
            ],
            next_token=token,
        )

    def ControllerGetVolume(self, request: pb.ControllerGetVolumeRequest,
                            context: grpc.ServicerContext) -> pb.ControllerGetVolumeResponse:
        # ControllerGetVolumeRequest carries no secrets: the backend's own credentials.
        name, backend, volume = self._existing(request.volume_id, secrets=NO_SECRETS)
        response = pb.ControllerGetVolumeResponse(volume=self._volume_pb(name, backend, volume))
        listed = self._status(backend, volume)
        if listed.HasField("volume_condition"):
            response.status.volume_condition.CopyFrom(listed.volume_condition)
        response.status.published_node_ids.extend(listed.published_node_ids)
        return response

    def ControllerExpandVolume(self, request: pb.ControllerExpandVolumeRequest,
                               context: grpc.ServicerContext
                               ) -> pb.ControllerExpandVolumeResponse:
        if not request.volume_id:
            raise errors.InvalidArgument("volume_id is required")
        rng = request.capacity_range
        if not request.HasField("capacity_range") or not (rng.required_bytes or rng.limit_bytes):
            raise errors.InvalidArgument("capacity_range is required")
        if rng.required_bytes < 0 or rng.limit_bytes < 0 or (
                rng.limit_bytes and rng.required_bytes > rng.limit_bytes):
            raise errors.InvalidArgument("capacity_range is inconsistent")
        with self.driver.locks.hold(f"id:{request.volume_id}"):
            _, backend, volume = self._existing(request.volume_id, secrets=request.secrets)
            if backend.features.expansion is Expansion.NONE:
                raise errors.InvalidArgument(f"backend {backend.name!r} cannot expand volumes")
            size, node_needed = backend.update_volume(VolumeUpdate(
                local_id=volume.local_id, size=rng.required_bytes or rng.limit_bytes,
                secrets=request.secrets))
        if rng.limit_bytes and size > rng.limit_bytes:
            raise errors.OutOfRange(
                f"the volume is already {size} bytes, more than limit_bytes {rng.limit_bytes}"
            )
        return pb.ControllerExpandVolumeResponse(capacity_bytes=size,
                                                 node_expansion_required=node_needed)

    def ControllerModifyVolume(self, request: pb.ControllerModifyVolumeRequest,
                               context: grpc.ServicerContext
                               ) -> pb.ControllerModifyVolumeResponse:
        if not request.volume_id:
            raise errors.InvalidArgument("volume_id is required")
        with self.driver.locks.hold(f"id:{request.volume_id}"):
            _, backend, volume = self._existing(request.volume_id, secrets=request.secrets)
            # proto3 cannot tell an empty map from a missing one, and csi-sanity sends it by
            # default: nothing to change on a volume that exists is a successful no-op.
            if not request.mutable_parameters:
                return pb.ControllerModifyVolumeResponse()
            mutable = dict(request.mutable_parameters)
            _check_mutable(backend, mutable)
            backend.update_volume(VolumeUpdate(local_id=volume.local_id,
                                               mutable_parameters=mutable,
                                               secrets=request.secrets))
        return pb.ControllerModifyVolumeResponse()

    def GetCapacity(self, request: pb.GetCapacityRequest, context: grpc.ServicerContext
                    ) -> pb.GetCapacityResponse:
        _, backend = self.driver.backend_for_parameters(request.parameters)
        caps = [capabilities.from_pb(c) for c in request.volume_capabilities]
        own = parameters.own(request.parameters)
        if any(capabilities.unsupported(backend, c, own) for c in caps):
            return pb.GetCapacityResponse(available_capacity=0)
        if request.HasField("accessible_topology") and not _reachable(
                backend, [dict(request.accessible_topology.segments)]):
            return pb.GetCapacityResponse(available_capacity=0)
        capacity = backend.capacity(own)
        response = pb.GetCapacityResponse(available_capacity=capacity.available)
        if capacity.maximum_volume_size is not None:
            response.maximum_volume_size.CopyFrom(Int64Value(value=capacity.maximum_volume_size))
        if capacity.minimum_volume_size is not None:
            response.minimum_volume_size.CopyFrom(Int64Value(value=capacity.minimum_volume_size))
        return response

    def ControllerGetCapabilities(
        self, request: pb.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.ControllerGetCapabilitiesResponse:
        features = [b.features for b in self.driver.backends.values()]
        wanted = [_Cap.CREATE_DELETE_VOLUME, _Cap.LIST_VOLUMES, _Cap.GET_CAPACITY]
        for cap, present in (
            (_Cap.SINGLE_NODE_MULTI_WRITER,
             any(AccessMode.SINGLE_NODE_MULTI_WRITER in f.access_modes for f in features)),
            (_Cap.CREATE_DELETE_SNAPSHOT, any(f.snapshots for f in features)),
            (_Cap.LIST_SNAPSHOTS, any(f.snapshots for f in features)),
            # csi-test v5.5 knows GET_SNAPSHOT (v5.4 failed a driver that listed it).
            (_Cap.GET_SNAPSHOT, any(f.snapshots for f in features)),
            (_Cap.CLONE_VOLUME, any(f.clones for f in features)),
            (_Cap.EXPAND_VOLUME, any(f.expansion is not Expansion.NONE for f in features)),
            (_Cap.GET_VOLUME, True),
            (_Cap.VOLUME_CONDITION, any(f.volume_condition for f in features)),
            (_Cap.MODIFY_VOLUME, any(f.mutable_parameters for f in features)),
            (_Cap.PUBLISH_UNPUBLISH_VOLUME, any(f.attach for f in features)),
            (_Cap.PUBLISH_READONLY, any(f.attach for f in features)),
            (_Cap.LIST_VOLUMES_PUBLISHED_NODES, any(f.attach for f in features)),
        ):
            if present:
                wanted.append(cap)
        return pb.ControllerGetCapabilitiesResponse(
            capabilities=[
                pb.ControllerServiceCapability(rpc=pb.ControllerServiceCapability.RPC(type=t))
                for t in wanted
            ]
        )
