"""The SnapshotMetadata service on RBD, against the session's real Ceph: allocation and deltas
from librbd's diff_iterate, streamed, resumed, and checked by rebuilding the second snapshot from
the first plus the delta, byte for byte.

librbd's granularity, which the expectations spell out: a delta is exact within the objects
(4 MiB) the base snapshot already had; an object first written since, and every object in an
allocation, reads from the object's start to the end of its data.

The patterns are written with librbd straight into the volume image (what any client of the
image, krbd, rbd-nbd or rbd-fuse, ends up doing); the snapshot's data is read the same way."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from csi_driver.csi import csi_pb2 as pb

from . import cbt
from .ceph.cluster import CephCluster
from .conftest import needs_root, status_of
from .harness import Driver, MiB, block_cap
from .test_rbd import (
    _admin_ioctx,
    create,
    delete,
    delete_snapshot,
    images,
    rbd,  # noqa: F401 - the module's driver
    snapshot,
    trash,
)

pytestmark = needs_root
KiB = 1024
OBJECT = 4 * MiB
# Objects 0, 1 (the last write crosses into it), 2 and 5.
FIRST = [(1 * MiB, 64 * KiB, 1), (9 * MiB + 12 * KiB, 4 * KiB, 2), (20 * MiB, MiB, 3),
         (4 * MiB - 8 * KiB, 16 * KiB, 4)]
# Into objects 0 and 5, which the first snapshot has, and into new objects 7 and 15.
SECOND = [(1 * MiB + 8 * KiB, 4 * KiB, 5), (30 * MiB, 12 * KiB, 6), (20 * MiB + 512 * KiB,
          256 * KiB, 7), (63 * MiB + MiB - 4 * KiB, 4 * KiB, 8)]
SECOND_DELTA = [(1 * MiB + 8 * KiB, 4 * KiB), (20 * MiB + 512 * KiB, 256 * KiB),
                (28 * MiB, 2 * MiB + 12 * KiB), (60 * MiB, 4 * MiB)]


def image_of(object_id: str, prefix: str) -> str:
    return prefix + object_id.split(":", 1)[1]


@contextlib.contextmanager
def opened(cluster: CephCluster, image: str, snap: str | None = None) -> Iterator[Any]:
    import rbd as librbd

    with _admin_ioctx(cluster) as ctx, librbd.Image(ctx, image, snapshot=snap,
                                                    read_only=snap is not None) as img:
        yield img


def write(cluster: CephCluster, vid: str, writes: list[tuple[int, int, int]]) -> None:
    with opened(cluster, image_of(vid, "csi-vol-")) as img:
        for offset, length, byte in writes:
            img.write(bytes([byte]) * length, offset)
        img.flush()


def reader(cluster: CephCluster, snap_id: str) -> cbt.Reader:
    """Reads a CSI snapshot's data: its image at the `restore` snapshot."""
    def read(offset: int, length: int) -> bytes:
        with opened(cluster, image_of(snap_id, "csi-snap-"), "restore") as img:
            return bytes(img.read(offset, length))
    return read


def object_spans(writes: list[tuple[int, int, int]]) -> cbt.Ranges:
    """Allocation as librbd tells it: each object written, from its start to its data's end."""
    ends: dict[int, int] = {}
    for offset, length, _ in writes:
        for obj in range(offset // OBJECT, (offset + length - 1) // OBJECT + 1):
            ends[obj] = max(ends.get(obj, 0), min(offset + length, (obj + 1) * OBJECT))
    return cbt.merge((obj * OBJECT, end - obj * OBJECT) for obj, end in ends.items())


def user_snaps(cluster: CephCluster, image: str) -> list[str]:
    out = json.loads(cluster.rbd("snap", "ls", "--format", "json", f"{cluster.pool}/{image}"))
    return sorted(s["name"] for s in out)


def test_allocated_delta_resume_rebuild(rbd: Driver) -> None:  # noqa: F811
    cluster: CephCluster = rbd.cluster  # type: ignore[attr-defined]
    caps = rbd.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
    assert pb.PluginCapability.Service.SNAPSHOT_METADATA_SERVICE in {
        c.service.type for c in caps}
    vid = create(rbd, "cbt-rbd", cap=block_cap()).volume_id
    write(cluster, vid, FIRST)
    s1 = snapshot(rbd, "cbt-rbd-1", vid).snapshot_id
    write(cluster, vid, SECOND)
    s2 = snapshot(rbd, "cbt-rbd-2", vid).snapshot_id

    got = cbt.allocated(rbd, s1)
    assert got.kind == pb.BlockMetadataType.VARIABLE_LENGTH and got.capacity == 64 * MiB
    assert got.ranges == object_spans(FIRST) == [(0, OBJECT + 8 * KiB),
                                                 (8 * MiB, MiB + 16 * KiB), (20 * MiB, MiB)]
    assert cbt.allocated(rbd, s2).ranges == object_spans(FIRST + SECOND)
    assert (cbt.rebuild(got.capacity, got.ranges, reader(cluster, s1))
            == cbt.digest(reader(cluster, s1), got.capacity))

    delta = cbt.delta(rbd, s1, s2)
    assert delta.ranges == SECOND_DELTA
    target = reader(cluster, s2)
    assert (cbt.rebuild(delta.capacity, delta.ranges, target, reader(cluster, s1), 64 * MiB)
            == cbt.digest(target, delta.capacity))
    # Small messages, interrupted and resumed (sometimes from inside a range).
    assert cbt.allocated(rbd, s2, max_results=1).messages == len(object_spans(FIRST + SECOND))
    assert cbt.resumed(cbt.delta, rbd, s1, s2, max_results=1).ranges == SECOND_DELTA
    assert (cbt.resumed(cbt.allocated, rbd, s2, max_results=2).ranges
            == object_spans(FIRST + SECOND))
    assert status_of(lambda: cbt.delta(rbd, s1, s2, start=64 * MiB + 1)
                     ) == grpc.StatusCode.OUT_OF_RANGE
    assert status_of(lambda: cbt.delta(rbd, s2, s1)) == grpc.StatusCode.INVALID_ARGUMENT

    # Each CSI snapshot leaves its point on the volume, and takes it away when deleted.
    vol_image = image_of(vid, "csi-vol-")
    assert user_snaps(cluster, vol_image) == sorted(
        f"snap-{image_of(s, 'csi-snap-')}" for s in (s1, s2))
    delete_snapshot(rbd, s1)
    assert user_snaps(cluster, vol_image) == [f"snap-{image_of(s2, 'csi-snap-')}"]
    assert status_of(lambda: cbt.delta(rbd, s1, s2)) == grpc.StatusCode.NOT_FOUND
    delete_snapshot(rbd, s2)
    delete(rbd, vid)
    assert not [i for i in images(cluster) if "cbt-rbd" in i or i == vol_image]
    assert trash(cluster) == []


def test_discard_resize_and_a_deleted_volume(rbd: Driver) -> None:  # noqa: F811
    """A range discarded between two snapshots is a change (it reads as zeros now); growth
    between them is in the delta, with the target's capacity; once the volume is deleted the
    points are gone, so a delta is FAILED_PRECONDITION, while allocation still answers."""
    cluster: CephCluster = rbd.cluster  # type: ignore[attr-defined]
    vid = create(rbd, "cbt-grow", size=16 * MiB, cap=block_cap()).volume_id
    write(cluster, vid, [(0, 8 * MiB, 9)])
    s1 = snapshot(rbd, "cbt-grow-1", vid).snapshot_id
    with opened(cluster, image_of(vid, "csi-vol-")) as img:
        img.discard(4 * MiB, 4 * MiB)  # whole objects: they go away
    rbd.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=32 * MiB),
        secrets={"userID": cluster.csi_user, "userKey": cluster.csi_key}))
    write(cluster, vid, [(20 * MiB, 8 * KiB, 10)])
    s2 = snapshot(rbd, "cbt-grow-2", vid).snapshot_id
    got = cbt.delta(rbd, s1, s2)
    assert got.capacity == 32 * MiB
    assert got.ranges == [(4 * MiB, 4 * MiB), (20 * MiB, 8 * KiB)]
    target = reader(cluster, s2)
    assert (cbt.rebuild(got.capacity, got.ranges, target, reader(cluster, s1), 16 * MiB)
            == cbt.digest(target, got.capacity))

    # A snapshot taken the old way (its point moved to the trash namespace) cannot be diffed.
    s3 = snapshot(rbd, "cbt-grow-3", vid).snapshot_id
    with opened(cluster, image_of(vid, "csi-vol-")) as img:
        img.remove_snap(f"snap-{image_of(s3, 'csi-snap-')}")
    with pytest.raises(grpc.RpcError) as err:
        cbt.delta(rbd, s2, s3)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "full backup" in (err.value.details() or "")

    delete(rbd, vid)
    with pytest.raises(grpc.RpcError) as err:
        cbt.delta(rbd, s1, s2)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "deleted" in (err.value.details() or "")
    assert cbt.allocated(rbd, s2).ranges == [(0, 4 * MiB), (20 * MiB, 8 * KiB)]
    for s in (s1, s2, s3):
        delete_snapshot(rbd, s)
    assert trash(cluster) == []
