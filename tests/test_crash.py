"""kill -9 in the middle of an operation, restart, retry: the same result and no leftovers.

The driver kills itself with SIGKILL at a named point when BERTH_FAULTS names it
(csi_driver/faults.py), which is as abrupt as a kill from outside but lands deterministically.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from csi_driver.csi import csi_pb2 as pb
from csi_driver.csi import csi_pb2_grpc as pb_grpc

from .conftest import needs_root
from .harness import Driver, MiB, block_cap, loops_of, mount_cap, start_driver, write_config
from .test_node import stage, unstage

pytestmark = needs_root
Src = pb.VolumeContentSource


def config(tmp: Path) -> Path:
    return write_config(tmp / "c.yaml", {"local": {"type": "hostpath",
                                                   "path": str(tmp / "data")}})


def crash_during(tmp: Path, fault: str, call: Callable[[Driver], object]) -> None:
    """Run `call` on a driver armed with `fault` and check that it died of SIGKILL."""
    d = start_driver(tmp, config(tmp), env={"BERTH_FAULTS": fault})
    with pytest.raises(grpc.RpcError) as err:
        call(d)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert d.proc.wait(10) == -signal.SIGKILL


def assert_clean(tmp: Path) -> None:
    root = tmp / "data"
    assert list((root / ".tmp").iterdir()) == []
    assert list((root / ".trash").iterdir()) == []
    for image in root.glob("*/*/disk.img"):
        assert loops_of(image) == []


def create(d: Driver, name: str, source: Src | None = None,
           cap: pb.VolumeCapability | None = None) -> pb.Volume:
    req = pb.CreateVolumeRequest(name=name, volume_capabilities=[cap or mount_cap()],
                                 capacity_range=pb.CapacityRange(required_bytes=4 * MiB))
    if source is not None:
        req.volume_content_source.CopyFrom(source)
    return d.controller.CreateVolume(req).volume


def test_crash_in_create_volume(tmp_path: Path) -> None:
    crash_during(tmp_path, "create-volume", lambda d: create(d, "v"))
    assert list((tmp_path / "data" / ".tmp").iterdir()), "the crash left a half-made volume"
    assert list((tmp_path / "data" / "volumes").iterdir()) == []
    d = start_driver(tmp_path, config(tmp_path))
    try:
        assert_clean(tmp_path)  # purged at start
        vol = create(d, "v")
        assert create(d, "v") == vol
        assert len(list((tmp_path / "data" / "volumes").iterdir())) == 1
    finally:
        assert d.stop() == 0


def test_crash_in_create_snapshot_and_clone(tmp_path: Path) -> None:
    d = start_driver(tmp_path, config(tmp_path))
    vol = create(d, "src")
    (tmp_path / "data" / "volumes" / vol.volume_id.split(":")[1] / "f").write_text("x")
    assert d.stop() == 0
    crash_during(tmp_path, "create-snapshot", lambda d: d.controller.CreateSnapshot(
        pb.CreateSnapshotRequest(name="s", source_volume_id=vol.volume_id)))
    crash_during(tmp_path, "create-volume", lambda d: create(
        d, "clone", Src(volume=Src.VolumeSource(volume_id=vol.volume_id))))
    d = start_driver(tmp_path, config(tmp_path))
    try:
        assert_clean(tmp_path)
        assert list((tmp_path / "data" / "snapshots").iterdir()) == []
        snap = d.controller.CreateSnapshot(pb.CreateSnapshotRequest(
            name="s", source_volume_id=vol.volume_id)).snapshot
        clone = create(d, "clone", Src(volume=Src.VolumeSource(volume_id=vol.volume_id)))
        for v in (clone, create(d, "restore", Src(snapshot=Src.SnapshotSource(
                snapshot_id=snap.snapshot_id)))):
            data = tmp_path / "data" / "volumes" / v.volume_id.split(":")[1]
            assert (data / "f").read_text() == "x"
    finally:
        assert d.stop() == 0


def test_crash_in_delete_volume(tmp_path: Path) -> None:
    d = start_driver(tmp_path, config(tmp_path))
    vol = create(d, "doomed")
    assert d.stop() == 0
    crash_during(tmp_path, "delete-volume", lambda d: d.controller.DeleteVolume(
        pb.DeleteVolumeRequest(volume_id=vol.volume_id)))
    d = start_driver(tmp_path, config(tmp_path))
    try:
        d.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
        assert_clean(tmp_path)
        assert list((tmp_path / "data" / "volumes").iterdir()) == []
    finally:
        assert d.stop() == 0


def test_crash_in_block_stage_leaves_no_loop_device(tmp_path: Path) -> None:
    d = start_driver(tmp_path, config(tmp_path))
    vol = create(d, "blk", cap=block_cap())
    assert d.stop() == 0
    staging = tmp_path / "staging"
    staging.mkdir()
    crash_during(tmp_path, "stage", lambda d: stage(d, vol.volume_id, str(staging), block_cap()))
    image = tmp_path / "data" / "volumes" / vol.volume_id.split(":")[1] / "disk.img"
    assert len(loops_of(image)) == 1, "the crash came after the attach"
    d = start_driver(tmp_path, config(tmp_path))
    try:
        stage(d, vol.volume_id, str(staging), block_cap())  # the retry reuses the device
        assert len(loops_of(image)) == 1
        unstage(d, vol.volume_id, str(staging))
        assert_clean(tmp_path)
        d.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    finally:
        assert d.stop() == 0


def test_crash_in_image_stage_then_unstage_detaches(tmp_path: Path) -> None:
    d = start_driver(tmp_path, config(tmp_path))
    vol = d.controller.CreateVolume(pb.CreateVolumeRequest(
        name="img", volume_capabilities=[mount_cap()], parameters={"layout": "image"},
        capacity_range=pb.CapacityRange(required_bytes=16 * MiB))).volume
    assert d.stop() == 0
    staging = tmp_path / "staging"
    staging.mkdir()
    crash_during(tmp_path, "stage", lambda d: stage(d, vol.volume_id, str(staging)))
    d = start_driver(tmp_path, config(tmp_path))
    try:  # the CO gives up and unstages: the attached device must still go
        unstage(d, vol.volume_id, str(staging))
        assert_clean(tmp_path)
        d.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    finally:
        assert d.stop() == 0


def test_crash_in_group_snapshot(tmp_path: Path) -> None:
    d = start_driver(tmp_path, config(tmp_path))
    a, b = create(d, "a"), create(d, "b")
    assert d.stop() == 0
    req = pb.CreateVolumeGroupSnapshotRequest(name="g", source_volume_ids=[a.volume_id,
                                                                           b.volume_id])
    crash_during(tmp_path, "create-group-snapshot",
                 lambda d: pb_grpc.GroupControllerStub(d.channel).CreateVolumeGroupSnapshot(req))
    assert len(list((tmp_path / "data" / "snapshots").iterdir())) == 2  # members, no group
    d = start_driver(tmp_path, config(tmp_path))
    try:
        assert list((tmp_path / "data" / "snapshots").iterdir()) == []  # orphans purged
        group = pb_grpc.GroupControllerStub(d.channel).CreateVolumeGroupSnapshot(req)
        assert len(group.group_snapshot.snapshots) == 2
        assert_clean(tmp_path)
    finally:
        assert d.stop() == 0


def test_delete_after_crashed_stage_detaches_and_refuses_while_staged(tmp_path: Path) -> None:
    d = start_driver(tmp_path, config(tmp_path))
    vol = create(d, "blk2", cap=block_cap())
    staging = tmp_path / "staging"
    staging.mkdir()
    stage(d, vol.volume_id, str(staging), block_cap())
    with pytest.raises(grpc.RpcError) as err:
        d.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # staged: refused
    unstage(d, vol.volume_id, str(staging))
    assert d.stop() == 0
    crash_during(tmp_path, "stage", lambda d: stage(d, vol.volume_id, str(staging), block_cap()))
    image = tmp_path / "data" / "volumes" / vol.volume_id.split(":")[1] / "disk.img"
    assert len(loops_of(image)) == 1
    d = start_driver(tmp_path, config(tmp_path))
    try:
        # The crashed stage left an attached, unmounted device: delete detaches it.
        d.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
        assert loops_of(image) == []
        assert_clean(tmp_path)
        assert list((tmp_path / "data" / "volumes").iterdir()) == []
    finally:
        assert d.stop() == 0


def test_crash_while_frozen_thaws_at_restart(tmp_path: Path) -> None:
    """A group snapshot freezes its image volumes; a kill then must not leave them frozen."""
    d = start_driver(tmp_path, config(tmp_path))
    vol = d.controller.CreateVolume(pb.CreateVolumeRequest(
        name="frozen", volume_capabilities=[mount_cap()], parameters={"layout": "image"},
        capacity_range=pb.CapacityRange(required_bytes=16 * MiB))).volume
    staging = tmp_path / "staging"
    staging.mkdir()
    stage(d, vol.volume_id, str(staging))
    assert d.stop() == 0
    req = pb.CreateVolumeGroupSnapshotRequest(name="g", source_volume_ids=[vol.volume_id])
    crash_during(tmp_path, "create-snapshot",
                 lambda d: pb_grpc.GroupControllerStub(d.channel).CreateVolumeGroupSnapshot(req))
    d = start_driver(tmp_path, config(tmp_path))
    try:
        write = subprocess.run(  # a frozen filesystem would block this write for good
            ["sh", "-c", f"echo alive > {staging}/after && sync"], timeout=20, check=True)
        assert write.returncode == 0 and (staging / "after").read_text() == "alive\n"
        group = pb_grpc.GroupControllerStub(d.channel).CreateVolumeGroupSnapshot(req)
        assert len(group.group_snapshot.snapshots) == 1
        unstage(d, vol.volume_id, str(staging))
    finally:
        assert d.stop() == 0
