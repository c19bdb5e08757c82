"""CSI SnapshotMetadata service (alpha): which ranges of a snapshot hold data, and which changed
between two snapshots of one volume, streamed for backup tools (through the
external-snapshot-metadata sidecar).

The spec's rules live here for every backend: IDs checked and looked up, both snapshots of one
volume, offsets in range, ranges resumed from `starting_offset` in ascending order without
overlap, at most `max_results` a message, one metadata type a stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import grpc

from .. import errors
from ..backends.base import Backend, BlockMap, BlockQuery, Secrets, Snapshot
from ..csi import csi_pb2 as pb
from ..csi import csi_pb2_grpc as pb_grpc
from . import lookup
from .plugin import Plugin

DEFAULT_RESULTS = 1024  # ranges a message when the client leaves max_results 0 (~20 KB)
_FIXED = pb.BlockMetadataType.FIXED_LENGTH
_VARIABLE = pb.BlockMetadataType.VARIABLE_LENGTH


def _checked(ranges: Iterable[tuple[int, int]], start: int, block_size: int
             ) -> Iterator[tuple[int, int]]:
    """The backend's ranges from `start` on: those ending before it dropped, the first cut to
    begin there (when lengths may vary), and any disorder an error rather than a bad stream."""
    last_end = 0
    for offset, length in ranges:
        if length <= 0 or offset < last_end or (block_size and length != block_size):
            raise errors.Internal(f"backend gave a bad range ({offset}, {length})")
        last_end = offset + length
        if last_end <= start:
            continue
        if offset < start and not block_size:
            offset, length = start, last_end - start
        yield offset, length


class SnapshotMetadataService(pb_grpc.SnapshotMetadataServicer):
    def __init__(self, driver: Plugin) -> None:
        self.driver = driver

    def _snapshot(self, raw_id: str, field: str, secrets: Secrets
                  ) -> tuple[str, Backend[Any], Snapshot]:
        if not raw_id:
            raise errors.InvalidArgument(f"{field} is required")
        found = self.driver.backend_for_id(raw_id)
        snap = None
        if found is not None and found[1].features.snapshots:
            snap = lookup.snapshot(found[1], found[0].local, secrets=secrets)
        if found is None or snap is None:
            raise errors.NotFound(f"snapshot {raw_id!r} does not exist")
        return found[0].backend, found[1], snap

    @staticmethod
    def _limits(starting_offset: int, max_results: int) -> int:
        if starting_offset < 0:
            raise errors.OutOfRange(f"starting_offset {starting_offset} is negative")
        if max_results < 0:
            raise errors.InvalidArgument(f"max_results {max_results} is negative")
        return max_results or DEFAULT_RESULTS

    @staticmethod
    def _stream(found: BlockMap, start: int, per_message: int) -> Iterator[
            tuple[pb.BlockMetadataType, int, list[pb.BlockMetadata]]]:
        """(type, capacity, ranges) a message; one message even when no range is left, so the
        client learns the capacity."""
        if start > found.capacity:
            raise errors.OutOfRange(
                f"starting_offset {start} is past the end of the volume ({found.capacity} "
                f"bytes)")
        kind = _FIXED if found.block_size else _VARIABLE
        batch: list[pb.BlockMetadata] = []
        sent = False
        for offset, length in _checked(found.ranges, start, found.block_size):
            batch.append(pb.BlockMetadata(byte_offset=offset, size_bytes=length))
            if len(batch) == per_message:
                yield kind, found.capacity, batch
                batch, sent = [], True
        if batch or not sent:
            yield kind, found.capacity, batch

    def GetMetadataAllocated(self, request: pb.GetMetadataAllocatedRequest,
                             context: grpc.ServicerContext
                             ) -> Iterator[pb.GetMetadataAllocatedResponse]:
        per_message = self._limits(request.starting_offset, request.max_results)
        _, backend, snap = self._snapshot(request.snapshot_id, "snapshot_id", request.secrets)
        found = backend.block_map(BlockQuery(snapshot=snap.local_id,
                                             start=request.starting_offset,
                                             secrets=request.secrets))
        for kind, capacity, batch in self._stream(found, request.starting_offset, per_message):
            yield pb.GetMetadataAllocatedResponse(
                block_metadata_type=kind, volume_capacity_bytes=capacity, block_metadata=batch)

    def GetMetadataDelta(self, request: pb.GetMetadataDeltaRequest,
                         context: grpc.ServicerContext) -> Iterator[pb.GetMetadataDeltaResponse]:
        per_message = self._limits(request.starting_offset, request.max_results)
        name, backend, base = self._snapshot(request.base_snapshot_id, "base_snapshot_id",
                                             request.secrets)
        target_name, _, target = self._snapshot(request.target_snapshot_id,
                                                "target_snapshot_id", request.secrets)
        if target_name != name or target.source_volume != base.source_volume:
            raise errors.InvalidArgument(
                f"snapshots {request.base_snapshot_id!r} and {request.target_snapshot_id!r} "
                f"are of different volumes; a delta compares two snapshots of one volume")
        if base.created_at > target.created_at:
            raise errors.InvalidArgument(
                f"base snapshot {request.base_snapshot_id!r} was taken after target "
                f"{request.target_snapshot_id!r}; swap them")
        found = backend.block_map(BlockQuery(snapshot=target.local_id, base=base.local_id,
                                             start=request.starting_offset,
                                             secrets=request.secrets))
        if base.local_id == target.local_id:  # nothing differs
            found = BlockMap(found.capacity, (), found.block_size)
        for kind, capacity, batch in self._stream(found, request.starting_offset, per_message):
            yield pb.GetMetadataDeltaResponse(
                block_metadata_type=kind, volume_capacity_bytes=capacity, block_metadata=batch)
