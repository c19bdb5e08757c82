"""The benchmark scenarios. Each takes the tracked operations and a plan, and returns report rows.

Setup and teardown around a timed phase are untimed, but their errors are counted on the row they
serve, so a failure anywhere shows up in the report.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

import grpc

from csi_driver.csi import csi_pb2 as pb

from .csi import MiB, RpcFailure
from .measure import Measurement, run_pool
from .ops import Ops

T = TypeVar("T")
NODE_CONCURRENCY = 4
SNAPSHOT_POLLS = 6000  # x 0.1 s: how long a snapshot may take to become ready_to_use
SNAPSHOT_POLL_S = 0.1
_Cap = pb.ControllerServiceCapability.RPC.Type


@dataclass(frozen=True)
class Plan:
    create_delete: int = 1000
    create_concurrency: tuple[int, ...] = (1, 16)
    publish: int = 200
    stage_publish: int = 200
    lifecycle: int = 200
    fill_mib: int = 1024
    snapshot_reps: int = 3

    def scaled(self, factor: float) -> Plan:
        def n(value: int) -> int:
            return max(1, round(value * factor))

        return replace(self, create_delete=n(self.create_delete), publish=n(self.publish),
                       stage_publish=n(self.stage_publish), lifecycle=n(self.lifecycle),
                       snapshot_reps=n(self.snapshot_reps))


DEFAULT_PLAN = Plan()
QUICK_PLAN = Plan(create_delete=20, publish=10, stage_publish=10, lifecycle=10, fill_mib=64,
                  snapshot_reps=1)


def _chunk(base: bytes, index: int) -> bytes:
    # Each MiB starts with its own index, so no two blocks are equal (no dedup, detectable order).
    return index.to_bytes(8, "little") + base[8:]


def write_file(path: str, base: bytes, chunks: int) -> None:
    with open(path, "wb") as f:
        for i in range(chunks):
            f.write(_chunk(base, i))
        f.flush()
        os.fsync(f.fileno())


def _untimed(name: str, count: int, op: Callable[[int], None]) -> Measurement:
    return run_pool(name, NODE_CONCURRENCY, count, op)


# -- 1. create-delete ----------------------------------------------------------------------
def create_delete_at(ops: Ops, count: int, concurrency: int, size: int = MiB
                     ) -> list[Measurement]:
    """CreateVolume of `count` volumes at `concurrency`, then DeleteVolume of each at it."""
    ids = [""] * count

    def create(i: int) -> None:
        ids[i] = ops.create(f"cd-c{concurrency}-{i}", size)

    created = run_pool("create", concurrency, count, create)
    done = [v for v in ids if v]
    deleted = run_pool("delete", concurrency, len(done), lambda i: ops.delete(done[i]))
    return [created, deleted]


def create_delete(ops: Ops, plan: Plan, base: bytes) -> list[Measurement]:
    return [row for c in plan.create_concurrency
            for row in create_delete_at(ops, plan.create_delete, c)]


# -- 2. publish ----------------------------------------------------------------------------
@dataclass
class _Slot:
    name: str
    volume_id: str = ""
    staging: str = ""
    target: str = ""


def _prepare(ops: Ops, slots: list[_Slot], stage: bool) -> Measurement:
    def op(i: int) -> None:
        slot = slots[i]
        slot.volume_id = ops.create(slot.name, MiB)
        if stage:
            slot.staging = ops.stage(slot.volume_id, slot.name)

    return _untimed("setup", len(slots), op)


def _teardown(ops: Ops, slots: list[_Slot]) -> Measurement:
    def op(i: int) -> None:
        slot = slots[i]
        if slot.staging:
            ops.unstage(slot.volume_id, slot.staging)
            slot.staging = ""
        if slot.volume_id:
            ops.delete(slot.volume_id)
            slot.volume_id = ""

    return _untimed("teardown", len(slots), op)


def publish(ops: Ops, plan: Plan, base: bytes) -> list[Measurement]:
    """NodePublish/NodeUnpublish alone, on volumes that are already staged."""
    slots = [_Slot(f"pub-{i}") for i in range(plan.publish)]
    setup = _prepare(ops, slots, stage=True)
    ready = [s for s in slots if s.staging]

    def pub(i: int) -> None:
        slot = ready[i]
        slot.target = ops.publish(slot.volume_id, slot.staging, slot.name)

    def unpub(i: int) -> None:
        slot = live[i]
        ops.unpublish(slot.volume_id, slot.target)

    published = run_pool("publish", NODE_CONCURRENCY, len(ready), pub)
    published.absorb(setup)
    live = [s for s in ready if s.target]
    unpublished = run_pool("unpublish", NODE_CONCURRENCY, len(live), unpub)
    unpublished.absorb(_teardown(ops, slots))
    return [published, unpublished]


# -- 3. stage-publish ----------------------------------------------------------------------
def stage_publish(ops: Ops, plan: Plan, base: bytes) -> list[Measurement]:
    """Stage + publish + unpublish + unstage of an existing volume, timed as one operation."""
    slots = [_Slot(f"sp-{i}") for i in range(plan.stage_publish)]
    setup = _prepare(ops, slots, stage=False)
    ready = [s for s in slots if s.volume_id]

    def op(i: int) -> None:
        slot = ready[i]
        staging = ops.stage(slot.volume_id, slot.name)
        target = ops.publish(slot.volume_id, staging, slot.name)
        ops.unpublish(slot.volume_id, target)
        ops.unstage(slot.volume_id, staging)

    row = run_pool("stage-publish", NODE_CONCURRENCY, len(ready), op)
    row.absorb(setup)
    row.absorb(_teardown(ops, slots))
    return [row]


# -- 4. lifecycle --------------------------------------------------------------------------
def lifecycle(ops: Ops, plan: Plan, base: bytes) -> list[Measurement]:
    """A pod's whole life with its volume, writing 1 MiB; ops/s is volumes/s."""

    def op(i: int) -> None:
        name = f"life-{i}"
        volume_id = ops.create(name, MiB)
        staging = ops.stage(volume_id, name)
        target = ops.publish(volume_id, staging, name)
        write_file(os.path.join(target, "data.bin"), base, 1)
        ops.unpublish(volume_id, target)
        ops.unstage(volume_id, staging)
        ops.delete(volume_id)

    return [run_pool("lifecycle", NODE_CONCURRENCY, plan.lifecycle, op)]


# -- 5. snapshot and clone -----------------------------------------------------------------
def _timed(row: Measurement, fn: Callable[[], T]) -> T | None:
    """One sequential, timed call; None when it failed (the failure is on the row)."""
    start = time.perf_counter()
    try:
        value = fn()
    except RpcFailure as exc:
        row.fail(exc)
        return None
    elapsed = time.perf_counter() - start
    row.wall_s += elapsed
    row.latencies_ms.append(elapsed * 1000)
    return value


def _judge(row: Measurement, advertised: bool) -> None:
    """Failures of a feature the driver does not offer are reported as such, not as errors."""
    if not row.errors or row.latencies_ms:
        return
    if any(key.endswith(" UNIMPLEMENTED") for key in row.errors):
        row.status = "unimplemented"
    elif not advertised:
        row.status = "unsupported"
        row.note = f"not advertised; got {', '.join(k.split()[1] for k in row.errors)}"
    else:
        row.status = "error"


def _snapshot_ready(ops: Ops, volume_id: str, name: str) -> str:
    """CreateSnapshot, repeated (it is idempotent by name) until ready_to_use, as sidecars do."""
    for _ in range(SNAPSHOT_POLLS):
        snap = ops.snapshot(volume_id, name)
        if snap.ready_to_use:
            return snap.snapshot_id
        time.sleep(SNAPSHOT_POLL_S)
    raise RpcFailure("CreateSnapshot", grpc.StatusCode.DEADLINE_EXCEEDED,
                     f"not ready_to_use after {SNAPSHOT_POLLS * SNAPSHOT_POLL_S:.0f}s")


def _with_mounted(ops: Ops, volume_id: str, name: str, fn: Callable[[str], T]) -> T:
    staging = ops.stage(volume_id, name)
    try:
        target = ops.publish(volume_id, staging, name)
        try:
            return fn(target)
        finally:
            ops.unpublish(volume_id, target)
    finally:
        ops.unstage(volume_id, staging)


def _content_ok(base: bytes, chunks: int, target: str) -> bool:
    """The copy holds the whole file, with its first and last MiB intact."""
    path = os.path.join(target, "fill.bin")
    try:
        if os.path.getsize(path) != chunks * MiB:
            return False
        with open(path, "rb") as f:
            first = f.read(MiB)
            f.seek((chunks - 1) * MiB)
            last = f.read(MiB)
    except OSError:
        return False
    return first == _chunk(base, 0) and last == _chunk(base, chunks - 1)


def _verify(ops: Ops, row: Measurement, volume_id: str, base: bytes, chunks: int) -> None:
    check = functools.partial(_content_ok, base, chunks)
    try:
        ok = _with_mounted(ops, volume_id, f"verify-{row.scenario}", check)
    except RpcFailure as exc:
        row.fail(exc)
        return
    row.note = "data verified" if ok else "DATA MISMATCH in the copy"
    if not ok:
        ops.note_anomaly(f"{row.scenario}: the new volume does not hold the source's data")


def snapshot_clone(ops: Ops, plan: Plan, base: bytes) -> list[Measurement]:
    """Snapshot, restore and clone a volume holding `fill_mib` MiB, one at a time."""
    caps = ops.csi.controller_capabilities(pb.ControllerGetCapabilitiesRequest()).capabilities
    offered = {c.rpc.type for c in caps}
    chunks = plan.fill_mib
    size = (chunks + 64) * MiB
    fill = Measurement("fill", 1)
    snap_row, restore_row = Measurement("snapshot", 1), Measurement("restore", 1)
    clone_row, snap_del = Measurement("clone", 1), Measurement("snapshot-delete", 1)
    delete_row = Measurement("delete-filled", 1)
    rows = [fill, snap_row, restore_row, clone_row, snap_del, delete_row]

    try:
        source = ops.create("snap-source", size)
    except RpcFailure as exc:
        fill.fail(exc)
        return rows

    def write(target: str) -> None:
        write_file(os.path.join(target, "fill.bin"), base, chunks)

    # Timed with its stage and publish, which are noise next to writing the data.
    _timed(fill, functools.partial(_with_mounted, ops, source, "fill", write))
    if not fill.latencies_ms:
        _timed(delete_row, functools.partial(ops.delete, source))
        return rows
    fill.note = f"{chunks} MiB at {chunks / fill.wall_s:.0f} MiB/s"

    for rep in range(plan.snapshot_reps):
        _snapshot_rep(ops, rep, source, size, rows, base, chunks)
    _timed(delete_row, functools.partial(ops.delete, source))

    _judge(snap_row, _Cap.CREATE_DELETE_SNAPSHOT in offered)
    _judge(clone_row, _Cap.CLONE_VOLUME in offered)
    if not snap_row.latencies_ms:
        restore_row.status, restore_row.note = "skipped", "no snapshot to restore"
        snap_del.status = "skipped"
    else:
        _judge(restore_row, _Cap.CREATE_DELETE_SNAPSHOT in offered)
    return rows


def _snapshot_rep(ops: Ops, rep: int, source: str, size: int, rows: list[Measurement],
                  base: bytes, chunks: int) -> None:
    """One round: snapshot, restore, clone, check the copies (first round only), delete them.

    Copies are deleted each round so an image sized for a few copies suffices without reflink.
    """
    _, snap_row, restore_row, clone_row, snap_del, delete_row = rows
    copies: list[tuple[Measurement, str]] = []
    # A feature that failed once is not retried: the report needs its status, not N of them.
    snap_id = None
    if not snap_row.errors:
        snap_id = _timed(snap_row, functools.partial(_snapshot_ready, ops, source, f"snap-{rep}"))
    if snap_id is not None and not restore_row.errors:
        content = pb.VolumeContentSource(
            snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap_id))
        restored = _timed(restore_row, functools.partial(ops.create, f"restore-{rep}", size,
                                                         content))
        if restored is not None:
            copies.append((restore_row, restored))
    if not clone_row.errors:
        content = pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(
            volume_id=source))
        cloned = _timed(clone_row, functools.partial(ops.create, f"clone-{rep}", size, content))
        if cloned is not None:
            copies.append((clone_row, cloned))
    for row, volume_id in copies:
        if rep == 0:
            _verify(ops, row, volume_id, base, chunks)
        _timed(delete_row, functools.partial(ops.delete, volume_id))
    if snap_id is not None:
        _timed(snap_del, functools.partial(ops.delete_snapshot, snap_id))


SCENARIOS: dict[str, Callable[[Ops, Plan, bytes], list[Measurement]]] = {
    "create-delete": create_delete,
    "publish": publish,
    "stage-publish": stage_publish,
    "lifecycle": lifecycle,
    "snapshot": snapshot_clone,
}
