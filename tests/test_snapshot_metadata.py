"""The SnapshotMetadata service (changed block tracking) on hostPath block and image volumes, on
real reflink xfs and btrfs (the extent maps decide) and on ext4 (plain copies: the blocks both
snapshots hold are compared), and the spec's rules for every request.

Data is written through the volume's own loop device, as a pod would; a backup client
(tests/cbt.py) reads the streams, resumes them, and rebuilds each snapshot from the earlier one
plus the reported delta, which must match the snapshot byte for byte."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver.csi import csi_pb2 as pb

from . import cbt
from .conftest import needs_root, status_of
from .harness import (
    Driver,
    MiB,
    block_cap,
    mount_cap,
    mount_filesystem,
    start_driver,
    unmount_filesystem,
    write_config,
)
from .test_node import stage, unstage

pytestmark = needs_root
KiB = 1024
Mode = pb.VolumeCapability.AccessMode

# (offset, length, byte): what a pod writes before the first snapshot, and between the two.
FIRST = [(1 * MiB, 64 * KiB, 1), (9 * MiB + 12 * KiB, 4 * KiB, 2), (20 * MiB, MiB, 3),
         (63 * MiB, MiB, 4)]
SECOND = [(1 * MiB + 8 * KiB, 4 * KiB, 5), (30 * MiB, 3 * 4 * KiB, 6), (20 * MiB + 512 * KiB,
          256 * KiB, 7), (63 * MiB + MiB - 4 * KiB, 4 * KiB, 8)]


@pytest.fixture(scope="module", params=["xfs", "btrfs", "ext4"])
def cbtd(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Driver]:
    """A driver whose hostPath store is on xfs or btrfs (reflinks) or ext4 (plain copies)."""
    tmp = tmp_path_factory.mktemp(f"cbt-{request.param}")
    mnt = mount_filesystem(tmp, request.param, size="1G")
    d = start_driver(tmp, write_config(tmp / "c.yaml", {"local": {
        "type": "hostpath", "path": str(mnt / "berth")}}))
    d.root = mnt / "berth"  # type: ignore[attr-defined]
    yield d
    assert d.stop() == 0
    unmount_filesystem(mnt)


def snapshot_file(d: Driver, snap_id: str) -> str:
    return str(d.root / "snapshots" / snap_id.split(":", 1)[1] / "disk.img")  # type: ignore


def create(d: Driver, name: str, cap: pb.VolumeCapability, size: int = 64 * MiB,
           **params: str) -> str:
    return d.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name, capacity_range=pb.CapacityRange(required_bytes=size),
        volume_capabilities=[cap], parameters=params)).volume.volume_id


def snapshot(d: Driver, name: str, vid: str) -> str:
    return d.controller.CreateSnapshot(pb.CreateSnapshotRequest(
        name=name, source_volume_id=vid)).snapshot.snapshot_id


def write(device: Path, writes: list[tuple[int, int, int]]) -> None:
    fd = os.open(device, os.O_WRONLY)
    try:
        for offset, length, byte in writes:
            os.pwrite(fd, bytes([byte]) * length, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def ranges_of(writes: list[tuple[int, int, int]]) -> cbt.Ranges:
    return cbt.merge((o, n) for o, n, _ in writes)


@pytest.fixture()
def pair(cbtd: Driver, tmp_path: Path, request: pytest.FixtureRequest
         ) -> Iterator[tuple[str, str, str]]:
    """A 64 MiB block volume written with FIRST, snapshotted, written with SECOND,
    snapshotted again: (volume, first snapshot, second snapshot)."""
    name = request.node.name.replace("[", "-").replace("]", "")
    vid = create(cbtd, f"{name}-v", block_cap())
    staging = tmp_path / "s"
    staging.mkdir()
    stage(cbtd, vid, str(staging), block_cap())
    try:
        write(staging / "device", FIRST)
        s1 = snapshot(cbtd, f"{name}-1", vid)
        write(staging / "device", SECOND)
        s2 = snapshot(cbtd, f"{name}-2", vid)
    finally:
        unstage(cbtd, vid, str(staging))
    yield vid, s1, s2
    for s in (s1, s2):
        cbtd.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=s))
    cbtd.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))


def test_advertised(cbtd: Driver) -> None:
    caps = cbtd.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
    assert pb.PluginCapability.Service.SNAPSHOT_METADATA_SERVICE in {
        c.service.type for c in caps}


def test_allocated_is_what_was_written(cbtd: Driver, pair: tuple[str, str, str]) -> None:
    _, s1, s2 = pair
    got = cbt.allocated(cbtd, s1)
    assert got.kind == pb.BlockMetadataType.VARIABLE_LENGTH
    assert got.capacity == 64 * MiB
    assert got.ranges == ranges_of(FIRST)
    assert cbt.allocated(cbtd, s2).ranges == ranges_of(FIRST + SECOND)
    # Zeros plus the allocated ranges are the snapshot.
    path = snapshot_file(cbtd, s1)
    assert (cbt.rebuild(got.capacity, got.ranges, cbt.file_reader(path))
            == cbt.digest(cbt.file_reader(path), got.capacity))


def test_delta_is_what_changed(cbtd: Driver, pair: tuple[str, str, str]) -> None:
    _, s1, s2 = pair
    got = cbt.delta(cbtd, s1, s2)
    assert got.ranges == ranges_of(SECOND)
    base, target = snapshot_file(cbtd, s1), snapshot_file(cbtd, s2)
    assert (cbt.rebuild(got.capacity, got.ranges, cbt.file_reader(target),
                        cbt.file_reader(base), 64 * MiB)
            == cbt.digest(cbt.file_reader(target), got.capacity))
    # The same snapshot twice: nothing changed, and the capacity still comes.
    same = cbt.delta(cbtd, s2, s2)
    assert same.ranges == [] and same.capacity == 64 * MiB and same.messages == 1


def test_streams_page_and_resume(cbtd: Driver, pair: tuple[str, str, str]) -> None:
    _, s1, s2 = pair
    paged = cbt.allocated(cbtd, s2, max_results=1)
    assert paged.messages == len(ranges_of(FIRST + SECOND))  # one range a message
    assert cbt.resumed(cbt.allocated, cbtd, s2, max_results=1).ranges == ranges_of(FIRST + SECOND)
    assert cbt.resumed(cbt.delta, cbtd, s1, s2, max_results=1).ranges == ranges_of(SECOND)
    # From the middle of a range: that range is cut to begin there.
    o, n = ranges_of(FIRST)[2]
    mid = cbt.allocated(cbtd, s1, start=o + n // 2)
    assert mid.ranges[0] == (o + n // 2, n - n // 2)
    assert mid.ranges[1:] == ranges_of(FIRST)[3:]
    # At the very end: nothing is left, but the stream still answers once.
    end = cbt.delta(cbtd, s1, s2, start=64 * MiB)
    assert end.ranges == [] and end.messages == 1


def test_delta_across_an_expansion(cbtd: Driver, tmp_path: Path) -> None:
    vid = create(cbtd, "grown-v", block_cap(), size=16 * MiB)
    staging = tmp_path / "s"
    staging.mkdir()
    stage(cbtd, vid, str(staging), block_cap())
    try:
        write(staging / "device", [(MiB, 4 * KiB, 1)])
        s1 = snapshot(cbtd, "grown-1", vid)
        cbtd.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=32 * MiB)))
        cbtd.node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
            volume_id=vid, volume_path=str(staging / "device"),
            staging_target_path=str(staging), volume_capability=block_cap()))
        write(staging / "device", [(20 * MiB, 8 * KiB, 2)])
        s2 = snapshot(cbtd, "grown-2", vid)
    finally:
        unstage(cbtd, vid, str(staging))
    got = cbt.delta(cbtd, s1, s2)
    assert got.capacity == 32 * MiB and got.ranges == [(20 * MiB, 8 * KiB)]
    assert cbt.allocated(cbtd, s1).capacity == 16 * MiB
    target = cbt.file_reader(snapshot_file(cbtd, s2))
    assert (cbt.rebuild(got.capacity, got.ranges, target,
                        cbt.file_reader(snapshot_file(cbtd, s1)), 16 * MiB)
            == cbt.digest(target, got.capacity))


def test_image_volume_rebuilds(cbtd: Driver, tmp_path: Path) -> None:
    """A filesystem in an image: what changes is files plus the filesystem's own metadata, so
    the delta is checked by rebuilding, and against the size of what was written."""
    vid = create(cbtd, "image-v", mount_cap(), size=128 * MiB, layout="image")
    staging = tmp_path / "s"
    staging.mkdir()
    stage(cbtd, vid, str(staging))
    try:
        (staging / "a").write_bytes(os.urandom(4 * MiB))
        os.sync()
        s1 = snapshot(cbtd, "image-1", vid)
        (staging / "b").write_bytes(os.urandom(2 * MiB))
        os.sync()
        s2 = snapshot(cbtd, "image-2", vid)
    finally:
        unstage(cbtd, vid, str(staging))
    got = cbt.delta(cbtd, s1, s2)
    changed = sum(n for _, n in got.ranges)
    assert 2 * MiB <= changed < 2 * MiB + 8 * MiB, changed  # the file, and some metadata
    target = cbt.file_reader(snapshot_file(cbtd, s2))
    assert (cbt.rebuild(got.capacity, got.ranges, target,
                        cbt.file_reader(snapshot_file(cbtd, s1)), got.capacity)
            == cbt.digest(target, got.capacity))


# -- the spec's errors ------------------------------------------------------------------------
def code(call: object) -> grpc.StatusCode:
    return status_of(call)


def test_bad_requests(cbtd: Driver, pair: tuple[str, str, str]) -> None:
    vid, s1, s2 = pair
    other = create(cbtd, "other-v", block_cap(), size=16 * MiB)
    s3 = snapshot(cbtd, "other-1", other)
    directory = create(cbtd, "dir-v", mount_cap(), size=16 * MiB, layout="directory")
    s4 = snapshot(cbtd, "dir-1", directory)
    try:
        cases = {
            grpc.StatusCode.INVALID_ARGUMENT: [
                lambda: cbt.allocated(cbtd, ""),
                lambda: cbt.delta(cbtd, "", s2),
                lambda: cbt.delta(cbtd, s1, ""),
                lambda: cbt.allocated(cbtd, s1, max_results=-1),
                lambda: cbt.delta(cbtd, s1, s3),  # another volume's
                lambda: cbt.delta(cbtd, s2, s1),  # the wrong way round
            ],
            grpc.StatusCode.NOT_FOUND: [
                lambda: cbt.allocated(cbtd, "local:nosuchsnapshot"),
                lambda: cbt.allocated(cbtd, "elsewhere:x"),
                lambda: cbt.allocated(cbtd, "not an id"),
                lambda: cbt.allocated(cbtd, vid),  # a volume, not a snapshot
                lambda: cbt.delta(cbtd, s1, "local:nosuchsnapshot"),
            ],
            grpc.StatusCode.OUT_OF_RANGE: [
                lambda: cbt.allocated(cbtd, s1, start=-1),
                lambda: cbt.allocated(cbtd, s1, start=64 * MiB + 1),
                lambda: cbt.delta(cbtd, s1, s2, start=1 << 40),
            ],
            grpc.StatusCode.FAILED_PRECONDITION: [
                lambda: cbt.allocated(cbtd, s4),  # a directory volume's: files, not blocks
            ],
        }
        for expected, calls in cases.items():
            for i, call in enumerate(calls):
                assert code(call) == expected, (expected, i)
        # Streams get the one log line every RPC gets, with the status they ended with.
        assert re.search(r"rpc=/csi.v1.SnapshotMetadata/GetMetadataAllocated id=\S+ "
                         r"status=OUT_OF_RANGE duration_ms=\S+ "
                         r"error='starting_offset -1 is negative'", cbtd.log())
    finally:
        for s in (s3, s4):
            cbtd.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=s))
        for v in (other, directory):
            cbtd.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v))


def test_node_plugin_serves_no_metadata(tmp_path: Path) -> None:
    """The sidecar talks to the controller; a node-only process has no such service."""
    d = start_driver(tmp_path, write_config(tmp_path / "c.yaml", {"local": {
        "type": "hostpath", "path": str(tmp_path / "store")}}), "--mode", "node")
    try:
        assert code(lambda: cbt.allocated(d, "local:x")) == grpc.StatusCode.UNIMPLEMENTED
        caps = d.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
        assert pb.PluginCapability.Service.SNAPSHOT_METADATA_SERVICE not in {
            c.service.type for c in caps}
    finally:
        assert d.stop() == 0
