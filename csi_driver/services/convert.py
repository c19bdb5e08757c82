"""Backend dataclasses -> CSI messages."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from ..backends.base import Condition, GroupSnapshot, Snapshot
from ..csi import csi_pb2 as pb
from ..ids import ObjectId


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def snapshot_pb(backend: str, snap: Snapshot) -> pb.Snapshot:
    return pb.Snapshot(
        snapshot_id=str(ObjectId(backend, snap.local_id)),
        source_volume_id=str(ObjectId(backend, snap.source_volume)),
        size_bytes=snap.size,
        creation_time=timestamp(snap.created_at),
        ready_to_use=snap.ready,
        group_snapshot_id=str(ObjectId(backend, snap.group)) if snap.group else "",
    )


def group_pb(backend: str, group: GroupSnapshot) -> pb.VolumeGroupSnapshot:
    return pb.VolumeGroupSnapshot(
        group_snapshot_id=str(ObjectId(backend, group.local_id)),
        snapshots=[snapshot_pb(backend, s) for s in group.snapshots],
        creation_time=timestamp(group.created_at),
        ready_to_use=group.ready and all(s.ready for s in group.snapshots),
    )


def condition_pb(condition: Condition) -> pb.VolumeCondition:
    return pb.VolumeCondition(abnormal=condition.abnormal, message=condition.message)
