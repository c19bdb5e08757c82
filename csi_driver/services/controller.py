"""CSI Controller service: argument checks, capacity and topology rules, locking, pagination."""

from __future__ import annotations

import bisect

import grpc
from google.protobuf.wrappers_pb2 import Int64Value

from .. import errors, ids
from ..backends.base import AccessMode, Backend, Volume, VolumeRequest
from ..csi import csi_pb2 as pb
from ..csi import csi_pb2_grpc as pb_grpc
from ..driver import Driver
from . import capabilities

_Cap = pb.ControllerServiceCapability.RPC.Type


def _size_for(capacity_range: pb.CapacityRange, backend: Backend) -> int:
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


class ControllerService(pb_grpc.ControllerServicer):
    def __init__(self, driver: Driver) -> None:
        self.driver = driver

    # -- helpers -------------------------------------------------------------------------
    def _topology(self, backend: Backend) -> list[pb.Topology]:
        if not backend.features.node_local:
            return []
        node = self.driver.node
        return [pb.Topology(segments={node.topology_key: node.node_id})]

    def _reachable(self, backend: Backend, requirement: pb.TopologyRequirement) -> bool:
        """Whether a node-local backend's volume can satisfy the accessibility requirement."""
        if not backend.features.node_local or not requirement.requisite:
            return True
        node = self.driver.node
        ours = {node.topology_key: node.node_id}
        return any(dict(t.segments) == ours for t in requirement.requisite)

    def _volume_pb(self, backend_name: str, backend: Backend, volume: Volume) -> pb.Volume:
        return pb.Volume(
            volume_id=str(ids.ObjectId(backend_name, volume.local_id)),
            capacity_bytes=volume.size,
            volume_context=dict(volume.context),
            accessible_topology=self._topology(backend),
        )

    # -- RPCs ----------------------------------------------------------------------------
    def CreateVolume(self, request: pb.CreateVolumeRequest, context: grpc.ServicerContext
                     ) -> pb.CreateVolumeResponse:
        if not request.name:
            raise errors.InvalidArgument("name is required")
        caps = capabilities.parse_all(request.volume_capabilities)
        parameters = dict(request.parameters)
        backend_name, backend = self.driver.backend_for_parameters(parameters)
        capabilities.require_supported(backend, caps)
        if request.HasField("volume_content_source"):
            raise errors.InvalidArgument(
                f"backend {backend_name!r} cannot create volumes from a snapshot or another volume"
            )
        own = self.driver.backend_parameters(parameters)
        unknown = sorted(set(own) - backend.features.parameters)
        if unknown:
            known = ", ".join(sorted(backend.features.parameters)) or "none"
            raise errors.InvalidArgument(
                f"unknown parameter(s) {', '.join(unknown)} for backend {backend_name!r} "
                f"({backend.type_name}); it accepts: {known}"
            )
        size = _size_for(request.capacity_range, backend)
        if request.HasField("accessibility_requirements") and not self._reachable(
            backend, request.accessibility_requirements
        ):
            raise errors.ResourceExhausted(
                f"backend {backend_name!r} stores volumes on node {self.driver.node.node_id!r}, "
                "which the accessibility requirements exclude"
            )
        with self.driver.locks.hold(f"name:{request.name}"):
            volume = backend.create_volume(
                VolumeRequest(name=request.name, size=size, capabilities=tuple(caps),
                              parameters=parameters)
            )
        if volume.name != request.name:
            raise errors.Internal("backend returned a volume of another name")
        if not _fits(volume.size, request.capacity_range) or dict(volume.parameters) != parameters:
            raise errors.AlreadyExists(
                f"volume {request.name!r} already exists with size {volume.size} and other "
                "parameters or capacity than requested"
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
            backend.delete_volume(parsed.local)
        return pb.DeleteVolumeResponse()

    def _existing(self, volume_id: str) -> tuple[str, Backend, Volume]:
        found = self.driver.backend_for_id(volume_id)
        volume = found[1].get_volume(found[0].local) if found else None
        if found is None or volume is None:
            raise errors.NotFound(f"volume {volume_id!r} does not exist")
        return found[0].backend, found[1], volume

    def ValidateVolumeCapabilities(
        self, request: pb.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.ValidateVolumeCapabilitiesResponse:
        if not request.volume_id:
            raise errors.InvalidArgument("volume_id is required")
        caps = capabilities.parse_all(request.volume_capabilities)
        _, backend, volume = self._existing(request.volume_id)
        reasons = [r for r in (capabilities.unsupported(backend, c) for c in caps) if r]
        if request.parameters and dict(request.parameters) != dict(volume.parameters):
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

    def ListVolumes(self, request: pb.ListVolumesRequest, context: grpc.ServicerContext
                    ) -> pb.ListVolumesResponse:
        if request.max_entries < 0:
            raise errors.InvalidArgument("max_entries must not be negative")
        if request.starting_token and ids.parse(request.starting_token) is None:
            raise errors.Aborted(f"starting_token {request.starting_token!r} was not issued by us")
        listed = sorted(
            (str(ids.ObjectId(name, v.local_id)), name, backend, v)
            for name, backend in self.driver.backends.items()
            for v in backend.list_volumes()
        )
        # The token is the ID of the next entry, so deletions between pages skip nothing.
        start = bisect.bisect_left([row[0] for row in listed], request.starting_token or "")
        end = start + request.max_entries if request.max_entries else len(listed)
        page = listed[start:end]
        return pb.ListVolumesResponse(
            entries=[
                pb.ListVolumesResponse.Entry(volume=self._volume_pb(name, backend, volume))
                for _, name, backend, volume in page
            ],
            next_token=listed[end][0] if end < len(listed) else "",
        )

    def GetCapacity(self, request: pb.GetCapacityRequest, context: grpc.ServicerContext
                    ) -> pb.GetCapacityResponse:
        _, backend = self.driver.backend_for_parameters(dict(request.parameters))
        caps = [capabilities.from_pb(c) for c in request.volume_capabilities]
        if any(capabilities.unsupported(backend, c) for c in caps):
            return pb.GetCapacityResponse(available_capacity=0)
        if request.HasField("accessible_topology") and backend.features.node_local:
            requirement = pb.TopologyRequirement(requisite=[request.accessible_topology])
            if not self._reachable(backend, requirement):
                return pb.GetCapacityResponse(available_capacity=0)
        capacity = backend.capacity(self.driver.backend_parameters(request.parameters))
        response = pb.GetCapacityResponse(available_capacity=capacity.available)
        if capacity.maximum_volume_size is not None:
            response.maximum_volume_size.CopyFrom(Int64Value(value=capacity.maximum_volume_size))
        if capacity.minimum_volume_size is not None:
            response.minimum_volume_size.CopyFrom(Int64Value(value=capacity.minimum_volume_size))
        return response

    def ControllerGetCapabilities(
        self, request: pb.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.ControllerGetCapabilitiesResponse:
        wanted = [_Cap.CREATE_DELETE_VOLUME, _Cap.LIST_VOLUMES, _Cap.GET_CAPACITY]
        if any(AccessMode.SINGLE_NODE_MULTI_WRITER in b.features.access_modes
               for b in self.driver.backends.values()):
            wanted.append(_Cap.SINGLE_NODE_MULTI_WRITER)
        return pb.ControllerGetCapabilitiesResponse(
            capabilities=[
                pb.ControllerServiceCapability(rpc=pb.ControllerServiceCapability.RPC(type=t))
                for t in wanted
            ]
        )
