"""Node service: stage/unstage, publish/unpublish with real bind mounts, stats, info, caps."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import grpc
import pytest

from csi_driver.csi import csi_pb2 as pb

from .conftest import needs_root, status_of
from .harness import NODE_ID, TOPOLOGY_KEY, Driver, MiB, block_cap, mount_cap, mounted_at

Mode = pb.VolumeCapability.AccessMode
NodeRPC = pb.NodeServiceCapability.RPC


def stage(d: Driver, vid: str, staging: str, cap: pb.VolumeCapability | None = None) -> None:
    d.node.NodeStageVolume(pb.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=staging, volume_capability=cap or mount_cap()))


def unstage(d: Driver, vid: str, staging: str) -> None:
    d.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid,
                                                         staging_target_path=staging))


def publish(d: Driver, vid: str, staging: str, target: str, readonly: bool = False,
            cap: pb.VolumeCapability | None = None) -> None:
    d.node.NodePublishVolume(pb.NodePublishVolumeRequest(
        volume_id=vid, staging_target_path=staging, target_path=target, readonly=readonly,
        volume_capability=cap or mount_cap()))


def unpublish(d: Driver, vid: str, target: str) -> None:
    d.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target))


# -- argument checks (no mounts needed) -------------------------------------------------------
@pytest.mark.parametrize("req", [
    pb.NodeStageVolumeRequest(staging_target_path="/tmp/s", volume_capability=mount_cap()),
    pb.NodeStageVolumeRequest(volume_id="local:x", volume_capability=mount_cap()),
    pb.NodeStageVolumeRequest(volume_id="local:x", staging_target_path="/tmp/s"),
], ids=["no-volume-id", "no-staging-path", "no-capability"])
def test_stage_missing_fields(driver: Driver, req: pb.NodeStageVolumeRequest) -> None:
    assert status_of(lambda: driver.node.NodeStageVolume(req)) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("req", [
    pb.NodeUnstageVolumeRequest(staging_target_path="/tmp/s"),
    pb.NodeUnstageVolumeRequest(volume_id="local:x"),
], ids=["no-volume-id", "no-staging-path"])
def test_unstage_missing_fields(driver: Driver, req: pb.NodeUnstageVolumeRequest) -> None:
    assert status_of(lambda: driver.node.NodeUnstageVolume(req)) == grpc.StatusCode.INVALID_ARGUMENT


def test_publish_without_staging_path_is_failed_precondition(driver: Driver,
                                                            volume: pb.Volume) -> None:
    req = pb.NodePublishVolumeRequest(volume_id=volume.volume_id, target_path="/tmp/t",
                                      volume_capability=mount_cap())
    code = status_of(lambda: driver.node.NodePublishVolume(req))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("field", ["volume_id", "target_path", "volume_capability"])
def test_publish_missing_fields(driver: Driver, field: str) -> None:
    req = pb.NodePublishVolumeRequest(volume_id="local:x", target_path="/tmp/t",
                                      staging_target_path="/tmp/s", volume_capability=mount_cap())
    req.ClearField(field)
    assert status_of(lambda: driver.node.NodePublishVolume(req)) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("req", [
    pb.NodeUnpublishVolumeRequest(target_path="/tmp/t"),
    pb.NodeUnpublishVolumeRequest(volume_id="local:x"),
], ids=["no-volume-id", "no-target-path"])
def test_unpublish_missing_fields(driver: Driver, req: pb.NodeUnpublishVolumeRequest) -> None:
    code = status_of(lambda: driver.node.NodeUnpublishVolume(req))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("vid", ["local:pvc-never-made", "garbage", "local:../../etc",
                                 "nope:x"])
def test_stage_unknown_volume_is_not_found(driver: Driver, paths: tuple[str, str],
                                           vid: str) -> None:
    staging, _ = paths
    assert status_of(lambda: stage(driver, vid, staging)) == grpc.StatusCode.NOT_FOUND
    assert not mounted_at(staging)


def test_stage_refuses_block_for_directory_volume(driver: Driver, volume: pb.Volume,
                                                  paths: tuple[str, str]) -> None:
    from .harness import block_cap

    code = status_of(lambda: stage(driver, volume.volume_id, paths[0], block_cap()))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    code = status_of(lambda: stage(driver, volume.volume_id, paths[0],
                                   mount_cap(Mode.MULTI_NODE_MULTI_WRITER)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert not mounted_at(paths[0])


@pytest.mark.parametrize("req", [
    pb.NodeGetVolumeStatsRequest(volume_path="/tmp"),
    pb.NodeGetVolumeStatsRequest(volume_id="local:x"),
], ids=["no-volume-id", "no-volume-path"])
def test_stats_missing_fields(driver: Driver, req: pb.NodeGetVolumeStatsRequest) -> None:
    code = status_of(lambda: driver.node.NodeGetVolumeStats(req))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_stats_of_path_that_does_not_exist(driver: Driver, volume: pb.Volume,
                                           tmp_path: Path) -> None:
    code = status_of(lambda: driver.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
        volume_id=volume.volume_id, volume_path=str(tmp_path / "missing"))))
    assert code == grpc.StatusCode.NOT_FOUND


def test_stats_of_path_that_is_not_the_volume(driver: Driver, volume: pb.Volume,
                                              tmp_path: Path) -> None:
    code = status_of(lambda: driver.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
        volume_id=volume.volume_id, volume_path=str(tmp_path))))
    assert code == grpc.StatusCode.NOT_FOUND


def test_node_info(driver: Driver) -> None:
    info = driver.node.NodeGetInfo(pb.NodeGetInfoRequest())
    assert info.node_id == NODE_ID
    assert dict(info.accessible_topology.segments) == {TOPOLOGY_KEY: NODE_ID}
    assert info.max_volumes_per_node == 0


def test_node_capabilities(driver: Driver) -> None:
    caps = {c.rpc.type for c in driver.node.NodeGetCapabilities(
        pb.NodeGetCapabilitiesRequest()).capabilities}
    assert caps == {NodeRPC.STAGE_UNSTAGE_VOLUME, NodeRPC.GET_VOLUME_STATS,
                    NodeRPC.SINGLE_NODE_MULTI_WRITER, NodeRPC.EXPAND_VOLUME,
                    NodeRPC.VOLUME_CONDITION}


# -- real mounts ------------------------------------------------------------------------------
@needs_root
def test_stage_is_idempotent_and_unstage_unmounts(driver: Driver, volume: pb.Volume,
                                                  paths: tuple[str, str]) -> None:
    staging, _ = paths
    stage(driver, volume.volume_id, staging)
    stage(driver, volume.volume_id, staging)
    assert mounted_at(staging)
    with open("/proc/self/mountinfo") as f:
        assert sum(line.split(" ")[4] == staging for line in f) == 1
    unstage(driver, volume.volume_id, staging)
    assert not mounted_at(staging)
    unstage(driver, volume.volume_id, staging)
    assert os.path.isdir(staging)  # the CO made it; the CO removes it


@needs_root
def test_publish_without_stage_is_failed_precondition(driver: Driver, volume: pb.Volume,
                                                      paths: tuple[str, str]) -> None:
    staging, target = paths
    code = status_of(lambda: publish(driver, volume.volume_id, staging, target))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert not os.path.exists(target)


@needs_root
def test_publish_creates_target_and_unpublish_removes_it(driver: Driver, volume: pb.Volume,
                                                         paths: tuple[str, str]) -> None:
    staging, target = paths
    stage(driver, volume.volume_id, staging)
    try:
        publish(driver, volume.volume_id, staging, target)
        publish(driver, volume.volume_id, staging, target)  # idempotent
        assert mounted_at(target)
        Path(target, "hello").write_text("world")
        assert Path(staging, "hello").read_text() == "world"
        unpublish(driver, volume.volume_id, target)
        assert not os.path.exists(target)
        unpublish(driver, volume.volume_id, target)  # idempotent
    finally:
        unstage(driver, volume.volume_id, staging)


@needs_root
def test_read_only_publish(driver: Driver, volume: pb.Volume, paths: tuple[str, str]) -> None:
    staging, target = paths
    stage(driver, volume.volume_id, staging)
    try:
        publish(driver, volume.volume_id, staging, target, readonly=True)
        with pytest.raises(OSError) as err:
            Path(target, "f").write_text("x")
        assert err.value.errno == 30  # EROFS
        # Repeating with readonly=False is an incompatible repeat.
        code = status_of(lambda: publish(driver, volume.volume_id, staging, target))
        assert code == grpc.StatusCode.ALREADY_EXISTS
        unpublish(driver, volume.volume_id, target)
    finally:
        unstage(driver, volume.volume_id, staging)


@needs_root
def test_reader_only_access_mode_mounts_read_only(driver: Driver, volume: pb.Volume,
                                                  paths: tuple[str, str]) -> None:
    staging, target = paths
    cap = mount_cap(Mode.SINGLE_NODE_READER_ONLY)
    stage(driver, volume.volume_id, staging, cap)
    try:
        publish(driver, volume.volume_id, staging, target, cap=cap)
        assert not os.access(target, os.W_OK) or os.statvfs(target).f_flag & os.ST_RDONLY
        unpublish(driver, volume.volume_id, target)
    finally:
        unstage(driver, volume.volume_id, staging)


@needs_root
def test_mount_flags_are_applied(driver: Driver, volume: pb.Volume,
                                 paths: tuple[str, str]) -> None:
    staging, target = paths
    cap = mount_cap(flags=("noexec", "nosuid,nodev"))
    stage(driver, volume.volume_id, staging, cap)
    try:
        publish(driver, volume.volume_id, staging, target, cap=cap)
        flags = os.statvfs(target).f_flag
        assert flags & os.ST_NOEXEC and flags & os.ST_NOSUID and flags & os.ST_NODEV
        unpublish(driver, volume.volume_id, target)
    finally:
        unstage(driver, volume.volume_id, staging)


@needs_root
def test_unknown_mount_flag_is_invalid_argument(driver: Driver, volume: pb.Volume,
                                                paths: tuple[str, str]) -> None:
    staging, target = paths
    stage(driver, volume.volume_id, staging)
    try:
        cap = mount_cap(flags=("uid=1000",))
        code = status_of(lambda: publish(driver, volume.volume_id, staging, target, cap=cap))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert not mounted_at(target)
    finally:
        unstage(driver, volume.volume_id, staging)


@needs_root
def test_publish_of_other_volume_on_same_target_is_already_exists(
        driver: Driver, volume: pb.Volume, paths: tuple[str, str], tmp_path: Path) -> None:
    staging, target = paths
    other = driver.controller.CreateVolume(pb.CreateVolumeRequest(
        name=f"{volume.volume_id}-other".replace(":", "-"),
        volume_capabilities=[mount_cap()])).volume
    staging2 = tmp_path / "staging2"
    staging2.mkdir()
    stage(driver, volume.volume_id, staging)
    stage(driver, other.volume_id, str(staging2))
    try:
        publish(driver, volume.volume_id, staging, target)
        code = status_of(lambda: publish(driver, other.volume_id, str(staging2), target))
        assert code == grpc.StatusCode.ALREADY_EXISTS
        unpublish(driver, volume.volume_id, target)
    finally:
        unstage(driver, volume.volume_id, staging)
        unstage(driver, other.volume_id, str(staging2))
        driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=other.volume_id))


@needs_root
def test_stats_of_published_volume(driver: Driver, volume: pb.Volume,
                                   paths: tuple[str, str]) -> None:
    staging, target = paths
    stage(driver, volume.volume_id, staging)
    try:
        publish(driver, volume.volume_id, staging, target)
        resp = driver.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
            volume_id=volume.volume_id, volume_path=target))
        usage = {u.unit: u for u in resp.usage}
        st = os.statvfs(target)
        b = usage[pb.VolumeUsage.BYTES]
        assert b.total == st.f_blocks * st.f_frsize
        assert 0 < b.available <= b.total and b.used <= b.total
        i = usage[pb.VolumeUsage.INODES]
        assert i.total == st.f_files and i.used <= i.total
        # Another volume's ID with this path is not this volume.
        code = status_of(lambda: driver.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
            volume_id="local:pvc-never-made", volume_path=target)))
        assert code == grpc.StatusCode.NOT_FOUND
        unpublish(driver, volume.volume_id, target)
    finally:
        unstage(driver, volume.volume_id, staging)


# -- spec rules on whose mount is whose -------------------------------------------------------
def test_unpublish_of_unknown_volume_is_not_found(driver: Driver, tmp_path: Path) -> None:
    for vid in ("local:pvc-never-made", "garbage"):
        code = status_of(lambda v=vid: unpublish(driver, v, str(tmp_path / "t")))  # type: ignore[misc]
        assert code == grpc.StatusCode.NOT_FOUND


def test_unstage_of_unknown_volume_is_not_found(driver: Driver, paths: tuple[str, str]) -> None:
    code = status_of(lambda: unstage(driver, "local:pvc-never-made", paths[0]))
    assert code == grpc.StatusCode.NOT_FOUND


@needs_root
@pytest.mark.parametrize("mode", [Mode.SINGLE_NODE_SINGLE_WRITER, Mode.SINGLE_NODE_WRITER])
def test_single_writer_modes_allow_one_writer(driver: Driver, volume: pb.Volume,
                                              paths: tuple[str, str], tmp_path: Path,
                                              mode: int) -> None:
    staging, target = paths
    cap = mount_cap(mode)
    second = str(tmp_path / "second")
    stage(driver, volume.volume_id, staging, cap)
    try:
        publish(driver, volume.volume_id, staging, target, cap=cap)
        code = status_of(lambda: publish(driver, volume.volume_id, staging, second, cap=cap))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        publish(driver, volume.volume_id, staging, second, readonly=True, cap=cap)  # a reader
        unpublish(driver, volume.volume_id, second)
        unpublish(driver, volume.volume_id, target)
    finally:
        unstage(driver, volume.volume_id, staging)


@needs_root
def test_multi_writer_mode_allows_two_writers(driver: Driver, volume: pb.Volume,
                                              paths: tuple[str, str], tmp_path: Path) -> None:
    staging, target = paths
    cap = mount_cap(Mode.SINGLE_NODE_MULTI_WRITER)
    second = str(tmp_path / "second")
    stage(driver, volume.volume_id, staging, cap)
    try:
        publish(driver, volume.volume_id, staging, target, cap=cap)
        publish(driver, volume.volume_id, staging, second, cap=cap)
        Path(second, "x").write_text("shared")
        assert Path(target, "x").read_text() == "shared"
        unpublish(driver, volume.volume_id, second)
        unpublish(driver, volume.volume_id, target)
    finally:
        unstage(driver, volume.volume_id, staging)


@needs_root
def test_delete_of_mounted_volume_is_refused(driver: Driver, volume: pb.Volume,
                                             paths: tuple[str, str]) -> None:
    staging, target = paths
    stage(driver, volume.volume_id, staging)
    try:
        publish(driver, volume.volume_id, staging, target)
        Path(target, "keep").write_text("data")
        code = status_of(lambda: driver.controller.DeleteVolume(
            pb.DeleteVolumeRequest(volume_id=volume.volume_id)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert Path(target, "keep").read_text() == "data"
        unpublish(driver, volume.volume_id, target)
    finally:
        unstage(driver, volume.volume_id, staging)


@pytest.mark.parametrize("block", [False, True], ids=["directory", "block"])
def test_unpublish_of_a_volume_in_use_is_failed_precondition(driver: Driver, tmp_path: Path,
                                                             block: bool) -> None:
    """A healthy mount that a process still uses is not detached lazily under it: for a
    bind-mounted device file too (whose path has no entries to look up)."""
    cap = block_cap() if block else mount_cap()
    vol = driver.controller.CreateVolume(pb.CreateVolumeRequest(
        name=f"busy-{block}", capacity_range=pb.CapacityRange(required_bytes=16 * MiB),
        volume_capabilities=[cap])).volume
    staging, target = tmp_path / "staging", tmp_path / "target"
    staging.mkdir()
    stage(driver, vol.volume_id, str(staging), cap)
    publish(driver, vol.volume_id, str(staging), str(target), cap=cap)
    with open(target, "rb") if block else open(os.devnull, "rb") as held:
        holder = subprocess.Popen(["sleep", "60"], stdin=held, cwd=None if block else target)
    try:
        assert status_of(lambda: unpublish(driver, vol.volume_id, str(target))
                         ) == grpc.StatusCode.FAILED_PRECONDITION
        assert mounted_at(target)
    finally:
        holder.kill()
        holder.wait()
    unpublish(driver, vol.volume_id, str(target))
    unstage(driver, vol.volume_id, str(staging))
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
