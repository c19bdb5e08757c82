"""A backup client of the SnapshotMetadata service, as the tests use it: it reads a stream
checking every rule the spec sets on it, resumes an interrupted one from `starting_offset`, and
rebuilds a snapshot from zeros plus its allocated ranges, or from an earlier snapshot plus the
delta, so a test can compare the result with the snapshot itself byte for byte."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from csi_driver.csi import csi_pb2 as pb

from .harness import Driver

Ranges = list[tuple[int, int]]
# Reads `length` bytes of a snapshot at `offset` (as its storage exposes it).
Reader = Callable[[int, int], bytes]


@dataclass
class Stream:
    kind: int
    capacity: int
    ranges: Ranges
    messages: int


def _read(responses: Iterable[pb.GetMetadataAllocatedResponse | pb.GetMetadataDeltaResponse],
          start: int, max_results: int, stop_after: int = 0) -> Stream:
    """Every response of a stream, checked: one type and capacity, at most max_results
    tuples a message, ascending without overlap, nothing ending at or before `start`, fixed
    lengths constant. `stop_after` messages, the client hangs up (an interrupted backup)."""
    kinds, capacities, ranges, messages = set(), set(), [], 0
    last_end = start
    for r in responses:
        messages += 1
        kinds.add(r.block_metadata_type)
        capacities.add(r.volume_capacity_bytes)
        assert not max_results or len(r.block_metadata) <= max_results
        for m in r.block_metadata:
            assert m.size_bytes > 0
            assert m.byte_offset + m.size_bytes > start
            assert not ranges or m.byte_offset >= last_end, "overlap or disorder"
            last_end = m.byte_offset + m.size_bytes
            ranges.append((m.byte_offset, m.size_bytes))
        if stop_after and messages == stop_after:
            break
    assert messages >= 1, "a stream without a message tells no capacity"
    assert len(kinds) == 1 and len(capacities) == 1, (kinds, capacities)
    kind = kinds.pop()
    assert kind in (pb.BlockMetadataType.FIXED_LENGTH, pb.BlockMetadataType.VARIABLE_LENGTH)
    if kind == pb.BlockMetadataType.FIXED_LENGTH:
        assert len({n for _, n in ranges}) <= 1
    capacity = capacities.pop()
    assert all(o + n <= capacity for o, n in ranges)
    return Stream(kind, capacity, ranges, messages)


def allocated(d: Driver, snap: str, start: int = 0, max_results: int = 0,
              stop_after: int = 0) -> Stream:
    return _read(d.metadata.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(
        snapshot_id=snap, starting_offset=start, max_results=max_results)),
        start, max_results, stop_after)


def delta(d: Driver, base: str, target: str, start: int = 0, max_results: int = 0,
          stop_after: int = 0) -> Stream:
    return _read(d.metadata.GetMetadataDelta(pb.GetMetadataDeltaRequest(
        base_snapshot_id=base, target_snapshot_id=target, starting_offset=start,
        max_results=max_results)), start, max_results, stop_after)


def resumed(get: Callable[..., Stream], d: Driver, *ids: str, max_results: int = 2
            ) -> Stream:
    """The whole stream read the way a client survives interruptions: one message at a time,
    each time asking again from the byte after the last range received (or from its middle,
    which the driver must cut the range at)."""
    start, ranges, capacity, kind, messages = 0, Ranges(), 0, 0, 0
    while True:
        part = get(d, *ids, start=start, max_results=max_results, stop_after=1)
        capacity, kind, messages = part.capacity, part.kind, messages + 1
        if not part.ranges:
            return Stream(kind, capacity, merge(ranges), messages)
        ranges.extend(part.ranges)
        end = part.ranges[-1][0] + part.ranges[-1][1]
        # Ask from inside the last range now and then: the overlap is dropped on merging.
        start = end - 1 if messages % 3 == 0 and part.ranges[-1][1] > 1 else end


def merge(ranges: Iterable[tuple[int, int]]) -> Ranges:
    out: Ranges = []
    for o, n in sorted(ranges):
        if out and out[-1][0] + out[-1][1] >= o:
            po, pn = out[-1]
            out[-1] = (po, max(po + pn, o + n) - po)
        else:
            out.append((o, n))
    return out


def covered(ranges: Iterable[tuple[int, int]], granule: int) -> Ranges:
    """`ranges` widened to whole granules (what a backend of that granularity reports)."""
    return merge((o // granule * granule,
                  -(-(o + n) // granule) * granule - o // granule * granule) for o, n in ranges)


def _chunks(ranges: Iterable[tuple[int, int]], size: int = 1 << 20
            ) -> Iterator[tuple[int, int]]:
    for o, n in ranges:
        for k in range(o, o + n, size):
            yield k, min(size, o + n - k)


def rebuild(capacity: int, ranges: Iterable[tuple[int, int]], target: Reader,
            base: Reader | None = None, base_size: int = 0) -> str:
    """SHA-256 of the image a backup restores: the base (or zeros) with `ranges` of the
    target laid over it, `capacity` bytes long."""
    image = bytearray(capacity)
    if base is not None:
        for o, n in _chunks([(0, min(base_size, capacity))]):
            image[o:o + n] = base(o, n)
    for o, n in _chunks(ranges):
        image[o:o + n] = target(o, n)
    return hashlib.sha256(image).hexdigest()


def digest(reader: Reader, capacity: int) -> str:
    h = hashlib.sha256()
    for o, n in _chunks([(0, capacity)]):
        h.update(reader(o, n))
    return h.hexdigest()


def file_reader(path: str) -> Reader:
    def read(offset: int, length: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length).ljust(length, b"\0")
    return read
