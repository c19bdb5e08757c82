"""hostPath block and filesystem-image volumes on real loop devices: size enforcement, expansion,
ControllerGetVolume and volume conditions, ControllerModifyVolume."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver.csi import csi_pb2 as pb

from .conftest import needs_root, status_of
from .harness import (
    Driver,
    MiB,
    block_cap,
    loops_of,
    mount_cap,
    mounted_at,
    start_driver,
    write_config,
)
from .test_node import publish, stage, unpublish, unstage

pytestmark = needs_root
Mode = pb.VolumeCapability.AccessMode


@pytest.fixture(scope="module")
def hp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    tmp = tmp_path_factory.mktemp("hp")
    d = start_driver(tmp, write_config(tmp / "c.yaml", {"local": {
        "type": "hostpath", "path": str(tmp / "data")}}))
    yield d
    assert d.stop() == 0


def data_root(d: Driver) -> Path:
    return d.socket.parent / "data"


def image_of(d: Driver, volume_id: str) -> Path:
    return data_root(d) / "volumes" / volume_id.split(":", 1)[1] / "disk.img"


def make(d: Driver, name: str, size: int, cap: pb.VolumeCapability,
         **params: str) -> pb.Volume:
    return d.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name, capacity_range=pb.CapacityRange(required_bytes=size),
        volume_capabilities=[cap], parameters=params)).volume


def delete(d: Driver, volume_id: str) -> None:
    d.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))


# -- raw block ---------------------------------------------------------------------------------
def test_block_volume_lifecycle(hp: Driver, tmp_path: Path) -> None:
    vol = make(hp, "blk", 8 * MiB, block_cap())
    image = image_of(hp, vol.volume_id)
    assert vol.capacity_bytes == 8 * MiB and image.stat().st_size == 8 * MiB
    assert image.stat().st_blocks == 0, "the backing file must be sparse"
    staging, target = tmp_path / "staging", tmp_path / "dev"
    staging.mkdir()
    payload = os.urandom(MiB)
    for round_ in range(2):
        stage(hp, vol.volume_id, str(staging), block_cap())
        publish(hp, vol.volume_id, str(staging), str(target), cap=block_cap())
        assert target.is_block_device() and len(loops_of(image)) == 1
        fd = os.open(target, os.O_RDWR)
        try:
            if round_ == 0:
                os.pwrite(fd, payload, 3 * MiB)
                os.fsync(fd)
            else:
                assert os.pread(fd, MiB, 3 * MiB) == payload
            assert os.lseek(fd, 0, os.SEEK_END) == 8 * MiB
        finally:
            os.close(fd)
        stats = hp.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
            volume_id=vol.volume_id, volume_path=str(target)))
        assert [(u.unit, u.total) for u in stats.usage] == [(pb.VolumeUsage.BYTES, 8 * MiB)]
        assert not stats.volume_condition.abnormal
        unpublish(hp, vol.volume_id, str(target))
        unstage(hp, vol.volume_id, str(staging))
        assert not target.exists() and loops_of(image) == []
    delete(hp, vol.volume_id)
    assert not image.exists()


def test_block_volume_cannot_be_mounted(hp: Driver, tmp_path: Path) -> None:
    vol = make(hp, "blk-as-mount", MiB, block_cap())
    try:
        code = status_of(lambda: stage(hp, vol.volume_id, str(tmp_path), mount_cap()))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        resp = hp.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id, volume_capabilities=[mount_cap()]))
        assert not resp.HasField("confirmed")
        code = status_of(lambda: make(hp, "blk-as-mount", MiB, mount_cap()))
        assert code == grpc.StatusCode.ALREADY_EXISTS
    finally:
        delete(hp, vol.volume_id)


def test_detached_loop_device_is_an_abnormal_condition(hp: Driver, tmp_path: Path) -> None:
    vol = make(hp, "blk-cond", 4 * MiB, block_cap())
    staging, target = tmp_path / "s", tmp_path / "t"
    staging.mkdir()
    stage(hp, vol.volume_id, str(staging), block_cap())
    publish(hp, vol.volume_id, str(staging), str(target), cap=block_cap())
    try:
        for device in loops_of(image_of(hp, vol.volume_id)):
            subprocess.run(["losetup", "-d", device], check=True)
        stats = hp.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
            volume_id=vol.volume_id, volume_path=str(target)))
        assert stats.volume_condition.abnormal
        assert "loop device" in stats.volume_condition.message
        # The mounts no longer show the volume: the node cannot tell them from foreign ones,
        # so it leaves them alone and says so (an admin unmounts them).
        for call, path in ((lambda: unpublish(hp, vol.volume_id, str(target)), target),
                           (lambda: unstage(hp, vol.volume_id, str(staging)), staging / "device")):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert str(path) in err.value.details() and "by hand" in err.value.details()
            assert mounted_at(path)
            subprocess.run(["umount", str(path)], check=True)
    finally:
        unpublish(hp, vol.volume_id, str(target))
        unstage(hp, vol.volume_id, str(staging))
        delete(hp, vol.volume_id)
    assert not mounted_at(target) and not mounted_at(staging / "device")
    assert not target.exists(), "the empty file publish made is removed"


# -- filesystem images: size enforced ------------------------------------------------------------
@pytest.mark.parametrize(("fs_type", "size"), [("ext4", 32 * MiB), ("xfs", 300 * MiB)])
def test_image_volume_enforces_size(hp: Driver, tmp_path: Path, fs_type: str, size: int) -> None:
    vol = make(hp, f"img-{fs_type}", size, mount_cap(fs_type=fs_type), layout="image")
    assert vol.volume_context["layout"] == "image" and vol.volume_context["fsType"] == fs_type
    staging, target = tmp_path / "s", tmp_path / "t"
    staging.mkdir()
    stage(hp, vol.volume_id, str(staging), mount_cap(fs_type=fs_type))
    try:
        publish(hp, vol.volume_id, str(staging), str(target), cap=mount_cap(fs_type=fs_type))
        mounted = Path("/proc/self/mountinfo").read_text().splitlines()
        entry = next(ln.split(" - ")[1] for ln in mounted if ln.split(" ")[4] == str(staging))
        assert entry.startswith(fs_type)
        with pytest.raises(OSError) as err, open(target / "big", "wb") as f:
            for _ in range(size // MiB + 1):
                f.write(b"x" * MiB)
                f.flush()
                os.fsync(f.fileno())
        assert err.value.errno == errno.ENOSPC
        stats = hp.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
            volume_id=vol.volume_id, volume_path=str(target)))
        assert stats.usage[0].total <= size
        unpublish(hp, vol.volume_id, str(target))
    finally:
        unstage(hp, vol.volume_id, str(staging))
    assert loops_of(image_of(hp, vol.volume_id)) == []
    delete(hp, vol.volume_id)


def test_image_is_formatted_once(hp: Driver, tmp_path: Path) -> None:
    vol = make(hp, "img-once", 32 * MiB, mount_cap(), layout="image")
    staging = tmp_path / "s"
    staging.mkdir()
    try:
        stage(hp, vol.volume_id, str(staging))
        (staging / "kept").write_text("yes")
        unstage(hp, vol.volume_id, str(staging))
        stage(hp, vol.volume_id, str(staging))
        assert (staging / "kept").read_text() == "yes"
        (tmp_path / "x").mkdir()
        code = status_of(lambda: stage(hp, vol.volume_id, str(tmp_path / "x"),
                                       mount_cap(fs_type="xfs")))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        unstage(hp, vol.volume_id, str(staging))
    finally:
        delete(hp, vol.volume_id)


def test_image_too_small_for_limit_is_out_of_range(hp: Driver) -> None:
    code = status_of(lambda: hp.controller.CreateVolume(pb.CreateVolumeRequest(
        name="tiny-xfs", capacity_range=pb.CapacityRange(limit_bytes=100 * MiB),
        volume_capabilities=[mount_cap(fs_type="xfs")], parameters={"layout": "image"})))
    assert code == grpc.StatusCode.OUT_OF_RANGE


def test_unknown_layout_and_filesystem(hp: Driver) -> None:
    for params, cap in (({"layout": "zfs"}, mount_cap()),
                        ({"layout": "image"}, mount_cap(fs_type="ntfs"))):
        code = status_of(lambda p=params, c=cap: make(hp, "bad", MiB, c, **p))  # type: ignore[misc]
        assert code == grpc.StatusCode.INVALID_ARGUMENT


# -- expansion -----------------------------------------------------------------------------------
def expand(d: Driver, volume_id: str, size: int) -> pb.ControllerExpandVolumeResponse:
    return d.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=volume_id, capacity_range=pb.CapacityRange(required_bytes=size)))


def test_directory_expansion_is_recorded(hp: Driver) -> None:
    vol = make(hp, "dir-grow", MiB, mount_cap())
    try:
        resp = expand(hp, vol.volume_id, 5 * MiB)
        assert resp.capacity_bytes == 5 * MiB and not resp.node_expansion_required
        got = hp.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(
            volume_id=vol.volume_id))
        assert got.volume.capacity_bytes == 5 * MiB
        assert expand(hp, vol.volume_id, 2 * MiB).capacity_bytes == 5 * MiB  # never shrinks
    finally:
        delete(hp, vol.volume_id)


def test_expansion_errors(hp: Driver) -> None:
    vol = make(hp, "grow-errors", MiB, mount_cap())
    try:
        code = status_of(lambda: hp.controller.ControllerExpandVolume(
            pb.ControllerExpandVolumeRequest(volume_id=vol.volume_id)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert status_of(lambda: expand(hp, "", MiB)) == grpc.StatusCode.INVALID_ARGUMENT
        assert status_of(lambda: expand(hp, "local:nope", MiB)) == grpc.StatusCode.NOT_FOUND
        code = status_of(lambda: hp.node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
            volume_id=vol.volume_id, volume_path="/nonexistent")))
        assert code == grpc.StatusCode.NOT_FOUND
    finally:
        delete(hp, vol.volume_id)


def test_xfs_image_grows_online(hp: Driver, tmp_path: Path) -> None:
    cap = mount_cap(fs_type="xfs")
    vol = make(hp, "xfs-grow", 300 * MiB, cap, layout="image")
    staging, target = tmp_path / "s", tmp_path / "t"
    staging.mkdir()
    stage(hp, vol.volume_id, str(staging), cap)
    publish(hp, vol.volume_id, str(staging), str(target), cap=cap)
    try:
        before = os.statvfs(target)
        resp = expand(hp, vol.volume_id, 600 * MiB)
        assert resp.capacity_bytes == 600 * MiB and resp.node_expansion_required
        grown = hp.node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
            volume_id=vol.volume_id, volume_path=str(target), staging_target_path=str(staging),
            capacity_range=pb.CapacityRange(required_bytes=600 * MiB)))
        assert grown.capacity_bytes == 600 * MiB
        after = os.statvfs(target)
        assert after.f_blocks * after.f_frsize > before.f_blocks * before.f_frsize + 250 * MiB
    finally:
        unpublish(hp, vol.volume_id, str(target))
        unstage(hp, vol.volume_id, str(staging))
        delete(hp, vol.volume_id)


def test_ext4_image_grows_while_unstaged(hp: Driver, tmp_path: Path) -> None:
    vol = make(hp, "ext4-grow", 32 * MiB, mount_cap(), layout="image")
    staging = tmp_path / "s"
    staging.mkdir()
    try:
        stage(hp, vol.volume_id, str(staging))
        (staging / "kept").write_text("yes")
        small = os.statvfs(staging).f_blocks * os.statvfs(staging).f_frsize
        unstage(hp, vol.volume_id, str(staging))
        assert expand(hp, vol.volume_id, 96 * MiB).node_expansion_required
        stage(hp, vol.volume_id, str(staging))
        st = os.statvfs(staging)
        assert st.f_blocks * st.f_frsize > small + 48 * MiB
        assert (staging / "kept").read_text() == "yes"
        unstage(hp, vol.volume_id, str(staging))
    finally:
        delete(hp, vol.volume_id)


# -- ControllerGetVolume, conditions, modify ---------------------------------------------------
def test_get_volume_and_condition(hp: Driver) -> None:
    vol = make(hp, "cond", 16 * MiB, mount_cap(), layout="image")
    try:
        got = hp.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(
            volume_id=vol.volume_id))
        assert got.volume == vol and not got.status.volume_condition.abnormal
        image_of(hp, vol.volume_id).unlink()  # what a careless operator does
        got = hp.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(
            volume_id=vol.volume_id))
        assert got.status.volume_condition.abnormal
        listed = {e.volume.volume_id: e.status for e in hp.controller.ListVolumes(
            pb.ListVolumesRequest()).entries}
        assert listed[vol.volume_id].volume_condition.abnormal
    finally:
        delete(hp, vol.volume_id)
    for vid in ("", "local:nope", "junk"):
        code = status_of(lambda v=vid: hp.controller.ControllerGetVolume(  # type: ignore[misc]
            pb.ControllerGetVolumeRequest(volume_id=v)))
        assert code == (grpc.StatusCode.INVALID_ARGUMENT if not vid else grpc.StatusCode.NOT_FOUND)


def test_modify_read_only_is_honoured(hp: Driver, tmp_path: Path) -> None:
    vol = make(hp, "modify", MiB, mount_cap())
    staging, target = tmp_path / "s", tmp_path / "t"
    staging.mkdir()
    try:
        hp.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
            volume_id=vol.volume_id, mutable_parameters={"readOnly": "true"}))
        stage(hp, vol.volume_id, str(staging))
        publish(hp, vol.volume_id, str(staging), str(target))
        assert os.statvfs(target).f_flag & os.ST_RDONLY
        unpublish(hp, vol.volume_id, str(target))
        unstage(hp, vol.volume_id, str(staging))
        hp.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
            volume_id=vol.volume_id, mutable_parameters={"readOnly": "false"}))
        stage(hp, vol.volume_id, str(staging))
        publish(hp, vol.volume_id, str(staging), str(target))
        (target / "w").write_text("writable again")
        unpublish(hp, vol.volume_id, str(target))
        unstage(hp, vol.volume_id, str(staging))
    finally:
        delete(hp, vol.volume_id)
    assert not mounted_at(staging)


@pytest.mark.parametrize(("params", "code"), [
    ({"iops": "5"}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"readOnly": "maybe"}, grpc.StatusCode.INVALID_ARGUMENT),
])
def test_modify_rejects_bad_parameters(hp: Driver, params: dict[str, str],
                                       code: grpc.StatusCode) -> None:
    vol = make(hp, "modify-bad", MiB, mount_cap())
    try:
        assert status_of(lambda: hp.controller.ControllerModifyVolume(
            pb.ControllerModifyVolumeRequest(volume_id=vol.volume_id,
                                             mutable_parameters=params))) == code
    finally:
        delete(hp, vol.volume_id)
    assert status_of(lambda: hp.controller.ControllerModifyVolume(
        pb.ControllerModifyVolumeRequest(volume_id="local:nope",
                                         mutable_parameters={"readOnly": "true"}))
                     ) == grpc.StatusCode.NOT_FOUND


def test_create_with_mutable_parameters(hp: Driver) -> None:
    ok = hp.controller.CreateVolume(pb.CreateVolumeRequest(
        name="born-ro", volume_capabilities=[mount_cap()],
        mutable_parameters={"readOnly": "true"}))
    delete(hp, ok.volume.volume_id)
    code = status_of(lambda: hp.controller.CreateVolume(pb.CreateVolumeRequest(
        name="born-bad", volume_capabilities=[mount_cap()], mutable_parameters={"x": "1"})))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("layout", ["directory", "image"])
@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_user_files_named_like_ours_are_left_alone(hp: Driver, tmp_path: Path, layout: str,
                                                   kind: str) -> None:
    """`device` is where a block stage puts its device node; in a filesystem it is the user's,
    and a symlink planted there must not make the driver unmount what it points at."""
    vol = make(hp, f"named-device-{layout}-{kind}", 16 * MiB, mount_cap(), layout=layout)
    staging, elsewhere = tmp_path / "s", tmp_path / "elsewhere"
    staging.mkdir()
    elsewhere.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(elsewhere)], check=True)
    try:
        stage(hp, vol.volume_id, str(staging))
        if kind == "file":
            (staging / "device").write_text("mine")
        else:
            os.symlink(str(elsewhere), staging / "device")
        unstage(hp, vol.volume_id, str(staging))
        assert mounted_at(elsewhere), "a planted symlink made the driver unmount something else"
        stage(hp, vol.volume_id, str(staging))
        assert os.path.lexists(staging / "device")
        if kind == "file":
            assert (staging / "device").read_text() == "mine"
        unstage(hp, vol.volume_id, str(staging))
    finally:
        subprocess.run(["umount", str(elsewhere)], check=False)
        delete(hp, vol.volume_id)
