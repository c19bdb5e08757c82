"""The scenarios of `--backend rbd`: the Ceph RBD backend with the fuse mounter, 64 MiB volumes.

Every controller request and every NodeStageVolume carries the secrets userID/userKey (Ops does
that), as external-provisioner and kubelet would send them from the StorageClass's Secrets.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from csi_driver.csi import csi_pb2 as pb

from .csi import MiB, RpcFailure
from .measure import Measurement, run_pool
from .ops import Ops
from .scenarios import (
    _Cap,
    _judge,
    _Slot,
    _snapshot_ready,
    _teardown,
    _timed,
    _untimed,
    create_delete_at,
)

T = TypeVar("T")


@dataclass(frozen=True)
class RbdPlan:
    create_delete: int = 200
    create_concurrency: tuple[int, ...] = (1, 16)
    snapshots: int = 20
    restores: int = 20
    clones: int = 20
    stage_publish: int = 10
    volume_mib: int = 64

    def scaled(self, factor: float) -> RbdPlan:
        def n(value: int) -> int:
            return max(1, round(value * factor))

        return replace(self, create_delete=n(self.create_delete), snapshots=n(self.snapshots),
                       restores=n(self.restores), clones=n(self.clones),
                       stage_publish=n(self.stage_publish))


RBD_DEFAULT_PLAN = RbdPlan()
RBD_QUICK_PLAN = RbdPlan(create_delete=20, snapshots=5, restores=5, clones=5, stage_publish=3)


# -- 1. create-delete ----------------------------------------------------------------------
def create_delete(ops: Ops, plan: RbdPlan, base: bytes) -> list[Measurement]:
    """CreateVolume of N volumes at concurrency C, then DeleteVolume of each at C."""
    return [row for c in plan.create_concurrency
            for row in create_delete_at(ops, plan.create_delete, c, plan.volume_mib * MiB)]


# -- 2. snapshot, restore, clone -----------------------------------------------------------
def snapshot_restore_clone(ops: Ops, plan: RbdPlan, base: bytes) -> list[Measurement]:
    """Sequential: N CreateSnapshot of one source volume (distinct names, each until
    ready_to_use), N CreateVolume from those snapshots, N CreateVolume cloning the source; then
    the deletions, copies first (clones keep their parents in the trash until they go)."""
    caps = ops.csi.controller_capabilities(pb.ControllerGetCapabilitiesRequest()).capabilities
    offered = {c.rpc.type for c in caps}
    size = plan.volume_mib * MiB
    snap_row, restore_row = Measurement("snapshot", 1), Measurement("restore", 1)
    clone_row, copies_del = Measurement("clone", 1), Measurement("delete-copies", 1)
    snap_del, source_del = Measurement("snapshot-delete", 1), Measurement("delete-source", 1)
    rows = [snap_row, restore_row, clone_row, copies_del, snap_del, source_del]
    try:
        source = ops.create("snap-source", size)
    except RpcFailure as exc:
        snap_row.fail(exc)
        return rows

    snapshots: list[str] = []
    for i in range(plan.snapshots):
        snap_id = _timed(snap_row, functools.partial(_snapshot_ready, ops, source, f"snap-{i}"))
        if snap_id is not None:
            snapshots.append(snap_id)
    copies: list[str] = []
    for i in range(plan.restores if snapshots else 0):
        content = pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(
            snapshot_id=snapshots[i % len(snapshots)]))
        restored = _timed(restore_row, functools.partial(ops.create, f"restore-{i}", size,
                                                         content))
        if restored is not None:
            copies.append(restored)
    for i in range(plan.clones):
        content = pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(
            volume_id=source))
        cloned = _timed(clone_row, functools.partial(ops.create, f"clone-{i}", size, content))
        if cloned is not None:
            copies.append(cloned)
    for volume_id in copies:
        _timed(copies_del, functools.partial(ops.delete, volume_id))
    for snap_id in snapshots:
        _timed(snap_del, functools.partial(ops.delete_snapshot, snap_id))
    _timed(source_del, functools.partial(ops.delete, source))

    _judge(snap_row, _Cap.CREATE_DELETE_SNAPSHOT in offered)
    _judge(clone_row, _Cap.CLONE_VOLUME in offered)
    if not snapshots:
        restore_row.status, restore_row.note = "skipped", "no snapshot to restore"
        snap_del.status = "skipped"
    else:
        _judge(restore_row, _Cap.CREATE_DELETE_SNAPSHOT in offered)
    return rows


# -- 3. stage-publish ----------------------------------------------------------------------
class _Part:
    """Times one step inside a timed operation on a row of its own; a failure is counted there
    and still ends the operation."""

    def __init__(self, row: Measurement) -> None:
        self.row = row
        self._lock = threading.Lock()

    def __call__(self, fn: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            value = fn()
        except RpcFailure as exc:
            with self._lock:
                self.row.fail(exc)
            raise
        elapsed = time.perf_counter() - start
        with self._lock:
            self.row.wall_s += elapsed
            self.row.latencies_ms.append(elapsed * 1000)
        return value


def stage_publish(ops: Ops, plan: RbdPlan, base: bytes) -> list[Measurement]:
    """Stage + publish + unpublish + unstage of fresh volumes at C=1, timed as one operation,
    with NodeStageVolume timed on its own: the first stage of a volume starts rbd-fuse, attaches
    a loop device, runs mkfs.ext4 and mounts; then each volume goes through the same cycle again,
    whose stage (`restage`) finds the filesystem made."""
    size = plan.volume_mib * MiB
    slots = [_Slot(f"sp-{i}") for i in range(plan.stage_publish)]

    def create(i: int) -> None:
        slots[i].volume_id = ops.create(slots[i].name, size)

    setup = _untimed("setup", len(slots), create)
    ready = [s for s in slots if s.volume_id]
    stage_row, restage_row = Measurement("stage", 1), Measurement("restage", 1)
    unstage = _Part(Measurement("unstage", 1))

    def cycle(stage: _Part) -> Callable[[int], None]:
        def op(i: int) -> None:
            slot = ready[i]
            slot.staging = stage(functools.partial(ops.stage, slot.volume_id, slot.name))
            target = ops.publish(slot.volume_id, slot.staging, slot.name)
            ops.unpublish(slot.volume_id, target)
            unstage(functools.partial(ops.unstage, slot.volume_id, slot.staging))
            slot.staging = ""

        return op

    # A failed step counts on its own row and on its cycle's.
    first = run_pool("stage-publish", 1, len(ready), cycle(_Part(stage_row)))
    first.absorb(setup)
    first.note = "fresh volumes"
    stage_row.note = "first stage: rbd-fuse + loop + mkfs.ext4 + mount"
    again = run_pool("restage-publish", 1, len(ready), cycle(_Part(restage_row)))
    again.note = "the same volumes again"
    restage_row.note = "rbd-fuse + loop + mount, no mkfs"
    unstage.row.note = "both cycles: umount + loop detach + fuse unmount"
    # _teardown unstages whatever a failed cycle left staged before deleting the volumes.
    again.absorb(_teardown(ops, slots))
    return [first, again, stage_row, restage_row, unstage.row]


RBD_SCENARIOS: dict[str, Callable[[Ops, RbdPlan, bytes], list[Measurement]]] = {
    "create-delete": create_delete,
    "snapshot": snapshot_restore_clone,
    "stage-publish": stage_publish,
}
RBD_ALIASES = {"clone": "snapshot", "restore": "snapshot", "create": "create-delete",
               "delete": "create-delete", "stage": "stage-publish"}
