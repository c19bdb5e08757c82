"""The snapshot RPCs of the Controller service (a mixin of ControllerService)."""

from __future__ import annotations

from typing import Any

import grpc

from .. import errors, ids
from ..backends.base import Backend, Query, SnapshotRequest
from ..csi import csi_pb2 as pb
from . import convert, lookup, pagination
from .plugin import Plugin


class SnapshotRPCs:
    driver: Plugin

    def _snapshot_backend(self, raw_id: str) -> tuple[ids.ObjectId, Backend[Any]] | None:
        found = self.driver.backend_for_id(raw_id)
        if found is None or not found[1].features.snapshots:
            return None
        return found

    def CreateSnapshot(self, request: pb.CreateSnapshotRequest, context: grpc.ServicerContext
                       ) -> pb.CreateSnapshotResponse:
        if not request.name:
            raise errors.InvalidArgument("name is required")
        if not request.source_volume_id:
            raise errors.InvalidArgument("source_volume_id is required")
        found = self.driver.backend_for_id(request.source_volume_id)
        if found is None:
            raise errors.NotFound(f"volume {request.source_volume_id!r} does not exist")
        parsed, backend = found
        if not backend.features.snapshots:
            raise errors.InvalidArgument(f"backend {parsed.backend!r} cannot take snapshots")
        with self.driver.locks.hold(f"name:{request.name}", f"id:{request.source_volume_id}"):
            if lookup.volume(backend, parsed.local, secrets=request.secrets,
                             condition=False) is None:
                raise errors.NotFound(f"volume {request.source_volume_id!r} does not exist")
            snap = backend.create_snapshot(SnapshotRequest(
                name=request.name, source_volume=parsed.local,
                parameters=dict(request.parameters), secrets=request.secrets))
        if snap.source_volume != parsed.local:
            raise errors.AlreadyExists(
                f"snapshot {request.name!r} already exists for another volume"
            )
        return pb.CreateSnapshotResponse(snapshot=convert.snapshot_pb(parsed.backend, snap))

    def DeleteSnapshot(self, request: pb.DeleteSnapshotRequest, context: grpc.ServicerContext
                       ) -> pb.DeleteSnapshotResponse:
        if not request.snapshot_id:
            raise errors.InvalidArgument("snapshot_id is required")
        found = self._snapshot_backend(request.snapshot_id)
        if found is not None:
            with self.driver.locks.hold(f"id:{request.snapshot_id}"):
                found[1].delete_snapshot(found[0].local, secrets=request.secrets)
        return pb.DeleteSnapshotResponse()

    def ListSnapshots(self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext
                      ) -> pb.ListSnapshotsResponse:
        snapshots: list[tuple[str, pb.Snapshot]] = []
        # Each filter narrows the backends asked (an ID names its backend), and what they list.
        snap = ids.parse(request.snapshot_id) if request.snapshot_id else None
        source = ids.parse(request.source_volume_id) if request.source_volume_id else None
        for name, backend in self.driver.backends.items():
            if (not backend.features.snapshots
                    or (request.snapshot_id and (snap is None or snap.backend != name))
                    or (request.source_volume_id and (source is None or source.backend != name))):
                continue
            query = Query(secrets=request.secrets, local_id=snap.local if snap else "",
                          source_volume=source.local if source else "")
            listed = self.driver.ready(backend).list_snapshots(query)
            snapshots += [(m.snapshot_id, m)
                          for m in (convert.snapshot_pb(name, s) for s in listed)]
        if request.snapshot_id:
            snapshots = [r for r in snapshots if r[0] == request.snapshot_id]
        if request.source_volume_id:
            snapshots = [r for r in snapshots if r[1].source_volume_id == request.source_volume_id]
        snapshots.sort(key=lambda row: row[0])
        entries, token = pagination.page(snapshots, request.max_entries, request.starting_token)
        return pb.ListSnapshotsResponse(
            entries=[pb.ListSnapshotsResponse.Entry(snapshot=s) for s in entries],
            next_token=token,
        )

    def GetSnapshot(self, request: pb.GetSnapshotRequest, context: grpc.ServicerContext
                    ) -> pb.GetSnapshotResponse:
        if not request.snapshot_id:
            raise errors.InvalidArgument("snapshot_id is required")
        found = self._snapshot_backend(request.snapshot_id)
        snap = lookup.snapshot(found[1], found[0].local, secrets=request.secrets) if found \
            else None
        if found is None or snap is None:
            raise errors.NotFound(f"snapshot {request.snapshot_id!r} does not exist")
        return pb.GetSnapshotResponse(snapshot=convert.snapshot_pb(found[0].backend, snap))

