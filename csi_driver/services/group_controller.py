"""CSI GroupController service: crash-consistent snapshots of several volumes at once."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc

from .. import errors, ids
from ..backends.base import Backend, GroupSnapshot, GroupSnapshotRequest
from ..csi import csi_pb2 as pb
from ..csi import csi_pb2_grpc as pb_grpc
from . import convert, lookup
from .plugin import Plugin

_Cap = pb.GroupControllerServiceCapability.RPC.Type


def _check_members(backend: str, group: GroupSnapshot, snapshot_ids: Iterable[str]) -> None:
    """A request that names the group's snapshots must name exactly them."""
    wanted = set(snapshot_ids)
    if wanted and wanted != {str(ids.ObjectId(backend, s.local_id)) for s in group.snapshots}:
        raise errors.FailedPrecondition(
            "snapshot_ids do not match the members of the group snapshot")


class GroupControllerService(pb_grpc.GroupControllerServicer):
    def __init__(self, driver: Plugin) -> None:
        self.driver = driver

    def _group_backend(self, raw_id: str) -> tuple[ids.ObjectId, Backend[Any]] | None:
        found = self.driver.backend_for_id(raw_id)
        if found is None or not found[1].features.group_snapshots:
            return None
        return found

    def GroupControllerGetCapabilities(
        self, request: pb.GroupControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.GroupControllerGetCapabilitiesResponse:
        caps = []
        if any(b.features.group_snapshots for b in self.driver.backends.values()):
            caps.append(pb.GroupControllerServiceCapability(
                rpc=pb.GroupControllerServiceCapability.RPC(
                    type=_Cap.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT)))
        return pb.GroupControllerGetCapabilitiesResponse(capabilities=caps)

    def CreateVolumeGroupSnapshot(self, request: pb.CreateVolumeGroupSnapshotRequest,
                                  context: grpc.ServicerContext
                                  ) -> pb.CreateVolumeGroupSnapshotResponse:
        if not request.name:
            raise errors.InvalidArgument("name is required")
        if not request.source_volume_ids:
            raise errors.InvalidArgument("source_volume_ids must not be empty")
        if len(set(request.source_volume_ids)) != len(request.source_volume_ids):
            raise errors.InvalidArgument("source_volume_ids lists a volume twice")
        parsed = []
        for raw in request.source_volume_ids:
            found = self.driver.backend_for_id(raw)
            if found is None or lookup.volume(found[1], found[0].local,
                                              secrets=request.secrets) is None:
                raise errors.NotFound(f"volume {raw!r} does not exist")
            parsed.append(found)
        backends = {p.backend for p, _ in parsed}
        if len(backends) > 1:
            raise errors.InvalidArgument(
                f"a group snapshot takes volumes of one backend; these span {sorted(backends)}"
            )
        name, backend = parsed[0][0].backend, parsed[0][1]
        if not backend.features.group_snapshots:
            raise errors.InvalidArgument(f"backend {name!r} cannot take group snapshots")
        locals_ = [p.local for p, _ in parsed]
        keys = [f"name:{request.name}", *(f"id:{v}" for v in request.source_volume_ids)]
        with self.driver.locks.hold(*keys):
            group = backend.create_group_snapshot(GroupSnapshotRequest(
                name=request.name, source_volumes=tuple(locals_),
                parameters=dict(request.parameters), secrets=request.secrets))
        if sorted(s.source_volume for s in group.snapshots) != sorted(locals_):
            raise errors.AlreadyExists(
                f"group snapshot {request.name!r} already exists with other volumes"
            )
        return pb.CreateVolumeGroupSnapshotResponse(group_snapshot=convert.group_pb(name, group))

    def DeleteVolumeGroupSnapshot(self, request: pb.DeleteVolumeGroupSnapshotRequest,
                                  context: grpc.ServicerContext
                                  ) -> pb.DeleteVolumeGroupSnapshotResponse:
        if not request.group_snapshot_id:
            raise errors.InvalidArgument("group_snapshot_id is required")
        found = self._group_backend(request.group_snapshot_id)
        if found is None:
            return pb.DeleteVolumeGroupSnapshotResponse()
        parsed, backend = found
        with self.driver.locks.hold(f"id:{request.group_snapshot_id}"):
            group = backend.get_group_snapshot(parsed.local, secrets=request.secrets)
            if group is None:
                return pb.DeleteVolumeGroupSnapshotResponse()
            _check_members(parsed.backend, group, request.snapshot_ids)
            backend.delete_group_snapshot(parsed.local, secrets=request.secrets)
        return pb.DeleteVolumeGroupSnapshotResponse()

    def GetVolumeGroupSnapshot(self, request: pb.GetVolumeGroupSnapshotRequest,
                               context: grpc.ServicerContext
                               ) -> pb.GetVolumeGroupSnapshotResponse:
        if not request.group_snapshot_id:
            raise errors.InvalidArgument("group_snapshot_id is required")
        found = self._group_backend(request.group_snapshot_id)
        group = (found[1].get_group_snapshot(found[0].local, secrets=request.secrets)
                 if found else None)
        if found is None or group is None:
            raise errors.NotFound(f"group snapshot {request.group_snapshot_id!r} does not exist")
        _check_members(found[0].backend, group, request.snapshot_ids)
        return pb.GetVolumeGroupSnapshotResponse(
            group_snapshot=convert.group_pb(found[0].backend, group))
