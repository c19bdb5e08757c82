"""The node service cannot be turned against its host: paths from the CO are input.

The drivers here take the temporary directory as their kubelet directory (tests/conftest.py),
so everything outside it (/etc, /root, /proc) must be refused, and inside it nothing that a
symlink, a planted mount or someone else's file could steer.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from csi_driver.csi import csi_pb2 as pb

from .conftest import needs_root, status_of
from .harness import Driver, MiB, block_cap, mounted_at
from .test_node import publish, stage, unpublish, unstage

pytestmark = needs_root
Code = grpc.StatusCode


def code_and_details(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return Code.OK, ""


@pytest.fixture
def staged(driver: Driver, volume: pb.Volume, paths: tuple[str, str]) -> tuple[str, str]:
    staging, _ = paths
    stage(driver, volume.volume_id, staging)
    yield paths  # type: ignore[misc]
    unstage(driver, volume.volume_id, staging)


def _node_still_works(driver: Driver, volume: pb.Volume, tmp_path: Path) -> None:
    """Every node RPC answered INTERNAL after a mount over /proc/self: check one still works."""
    code = status_of(lambda: driver.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
        volume_id=volume.volume_id, volume_path=str(tmp_path))))
    assert code == Code.NOT_FOUND


@pytest.mark.parametrize("target", ["/etc", "/root", "/berth-top-level", "relative/target",
                                    "/proc/self", "/proc/sys/kernel"])
def test_publish_outside_the_kubelet_dir_is_refused(driver: Driver, volume: pb.Volume,
                                                    staged: tuple[str, str], tmp_path: Path,
                                                    target: str) -> None:
    before = subprocess.run(["cat", "/proc/self/mountinfo"], capture_output=True, text=True).stdout
    code, details = code_and_details(
        lambda: publish(driver, volume.volume_id, staged[0], target))
    assert code == Code.INVALID_ARGUMENT, details
    assert "kubelet directory" in details or "absolute" in details
    assert not mounted_at(target) or f" {target} " in before
    assert not os.path.exists("/berth-top-level")
    _node_still_works(driver, volume, tmp_path)


@pytest.mark.parametrize("outside", ["/etc", "/root"])
def test_publish_onto_a_symlink_out_of_the_kubelet_dir_is_refused(
        driver: Driver, volume: pb.Volume, staged: tuple[str, str], tmp_path: Path,
        outside: str) -> None:
    link = tmp_path / "target"
    link.symlink_to(outside)
    code, details = code_and_details(
        lambda: publish(driver, volume.volume_id, staged[0], str(link)))
    assert code == Code.FAILED_PRECONDITION and "symlink" in details
    assert not mounted_at(outside)
    # Through a symlinked parent too.
    parent = tmp_path / "pods"
    parent.symlink_to(outside)
    code, details = code_and_details(
        lambda: publish(driver, volume.volume_id, staged[0], str(parent / "mount")))
    assert code == Code.FAILED_PRECONDITION and "symlink" in details
    assert not os.path.lexists(os.path.join(outside, "mount"))
    # Unpublish of the link: nothing removed, nothing unmounted.
    code, _ = code_and_details(lambda: unpublish(driver, volume.volume_id, str(link)))
    assert code == Code.FAILED_PRECONDITION
    assert link.is_symlink() and os.path.isdir(outside)


def test_stage_at_a_symlink_is_refused(driver: Driver, volume: pb.Volume,
                                       tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "staging"
    link.symlink_to(elsewhere)
    code, details = code_and_details(lambda: stage(driver, volume.volume_id, str(link)))
    assert code == Code.FAILED_PRECONDITION and "symlink" in details
    assert not mounted_at(elsewhere)
    code, _ = code_and_details(lambda: unstage(driver, volume.volume_id, str(link)))
    assert code == Code.FAILED_PRECONDITION
    assert link.is_symlink()


def test_publish_onto_a_non_empty_directory_is_refused(driver: Driver, volume: pb.Volume,
                                                       staged: tuple[str, str]) -> None:
    target = Path(staged[1])
    target.mkdir()
    (target / "precious").write_text("data")
    code, details = code_and_details(
        lambda: publish(driver, volume.volume_id, staged[0], str(target)))
    assert code == Code.FAILED_PRECONDITION and "not empty" in details
    assert not mounted_at(target)
    unpublish(driver, volume.volume_id, str(target))  # not published there: OK, nothing touched
    assert (target / "precious").read_text() == "data"


def test_publish_onto_a_file_for_a_mount_volume_is_refused(
        driver: Driver, volume: pb.Volume, staged: tuple[str, str]) -> None:
    Path(staged[1]).write_text("someone's file")
    code, _ = code_and_details(lambda: publish(driver, volume.volume_id, staged[0], staged[1]))
    assert code == Code.FAILED_PRECONDITION
    assert Path(staged[1]).read_text() == "someone's file"


def test_unpublish_never_removes_what_publish_did_not_make(
        driver: Driver, volume: pb.Volume, tmp_path: Path) -> None:
    kept_file = tmp_path / "file"
    kept_file.write_text("data")
    empty_file = tmp_path / "empty"
    empty_file.touch()
    empty_dir = tmp_path / "dir"
    empty_dir.mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "dir")
    for path in (kept_file, empty_file, empty_dir):
        unpublish(driver, volume.volume_id, str(path))
        assert os.path.lexists(path), f"unpublish removed {path}, which publish never made"
    assert status_of(lambda: unpublish(driver, volume.volume_id, str(link))) \
        == Code.FAILED_PRECONDITION
    assert link.is_symlink() and kept_file.read_text() == "data"


def test_an_existing_empty_target_is_used_and_left(driver: Driver, volume: pb.Volume,
                                                   staged: tuple[str, str]) -> None:
    """Kubelet may create the target itself: publish uses it, unpublish leaves it to kubelet."""
    target = Path(staged[1])
    target.mkdir()
    publish(driver, volume.volume_id, staged[0], str(target))
    assert mounted_at(target)
    unpublish(driver, volume.volume_id, str(target))
    assert not mounted_at(target) and target.is_dir()
    target.rmdir()


def _tmpfs(path: Path) -> None:
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "planted", str(path)], check=True)
    (path / "marker").write_text("foreign")


def test_unpublish_leaves_a_foreign_mount_alone(driver: Driver, volume: pb.Volume,
                                                tmp_path: Path) -> None:
    target = tmp_path / "target"
    _tmpfs(target)
    try:
        code, details = code_and_details(lambda: unpublish(driver, volume.volume_id,
                                                           str(target)))
        assert code == Code.FAILED_PRECONDITION
        assert "does not show volume" in details and "tmpfs" in details
        assert (target / "marker").read_text() == "foreign"
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_unpublish_of_an_unknown_volume_leaves_the_mount_alone(driver: Driver,
                                                               tmp_path: Path) -> None:
    target = tmp_path / "target"
    _tmpfs(target)
    try:
        # An ID no backend of ours can hold, and one of a volume that does not exist.
        for vid, want in (("nope:x", Code.NOT_FOUND), ("local:not-a-volume",
                                                        Code.FAILED_PRECONDITION)):
            assert status_of(lambda v=vid: unpublish(driver, v, str(target))) == want  # type: ignore[misc]
            assert (target / "marker").read_text() == "foreign"
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_unstage_and_stage_leave_a_foreign_mount_alone(driver: Driver, volume: pb.Volume,
                                                       tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    _tmpfs(staging)
    try:
        for call in (lambda: unstage(driver, volume.volume_id, str(staging)),
                     lambda: stage(driver, volume.volume_id, str(staging))):
            code, details = code_and_details(call)
            assert code == Code.FAILED_PRECONDITION and "does not show volume" in details
            assert (staging / "marker").read_text() == "foreign"
    finally:
        subprocess.run(["umount", str(staging)], check=True)


def test_publish_unpublish_of_the_volume_still_works(driver: Driver, volume: pb.Volume,
                                                     staged: tuple[str, str]) -> None:
    publish(driver, volume.volume_id, staged[0], staged[1])
    assert mounted_at(staged[1])
    unpublish(driver, volume.volume_id, staged[1])
    assert not os.path.lexists(staged[1]), "the directory publish made is removed"


# -- bad bytes are INVALID_ARGUMENT, never INTERNAL -------------------------------------------
@pytest.mark.parametrize("make_path", [
    lambda t: f"{t}/with\0nul",
    lambda t: f"{t}/{'x' * 300}",
    lambda t: f"{t}/../escape",
    lambda t: "x" * 5000,
], ids=["nul", "long-component", "dotdot", "long-path"])
def test_malformed_paths_are_invalid_argument(driver: Driver, volume: pb.Volume,
                                              tmp_path: Path,
                                              make_path: Callable[[str], str]) -> None:
    path = make_path(str(tmp_path))
    calls = [
        lambda: stage(driver, volume.volume_id, path),
        lambda: unstage(driver, volume.volume_id, path),
        lambda: publish(driver, volume.volume_id, str(tmp_path), path),
        lambda: unpublish(driver, volume.volume_id, path),
    ]
    for call in calls:
        code, details = code_and_details(call)
        assert code == Code.INVALID_ARGUMENT, details
        assert "Exception" not in details and "Traceback" not in details


@pytest.mark.parametrize("path", ["/etc", "some/path"])
def test_stats_and_expand_outside_the_kubelet_dir_are_not_found(driver: Driver, volume: pb.Volume,
                                                                path: str) -> None:
    """Nothing can be published there (csi-sanity sends "some/path" and expects NOT_FOUND)."""
    code = status_of(lambda: driver.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
        volume_id=volume.volume_id, volume_path=path)))
    assert code == Code.NOT_FOUND
    code = status_of(lambda: driver.node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
        volume_id=volume.volume_id, volume_path=path)))
    assert code == Code.NOT_FOUND


def test_block_stage_into_a_missing_staging_dir(driver: Driver, tmp_path: Path) -> None:
    vol = driver.controller.CreateVolume(pb.CreateVolumeRequest(
        name="paths-block", capacity_range=pb.CapacityRange(required_bytes=4 * MiB),
        volume_capabilities=[block_cap()], parameters={"layout": "block"})).volume
    try:
        code, details = code_and_details(
            lambda: stage(driver, vol.volume_id, str(tmp_path / "missing"), block_cap()))
        assert code == Code.FAILED_PRECONDITION and "does not exist" in details
        code, _ = code_and_details(
            lambda: stage(driver, vol.volume_id, str(tmp_path / "no" / "parent"), block_cap()))
        assert code == Code.FAILED_PRECONDITION
    finally:
        driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))


def test_block_publish_onto_a_file_with_data_is_refused(driver: Driver, tmp_path: Path) -> None:
    vol = driver.controller.CreateVolume(pb.CreateVolumeRequest(
        name="paths-block-target", capacity_range=pb.CapacityRange(required_bytes=4 * MiB),
        volume_capabilities=[block_cap()], parameters={"layout": "block"})).volume
    staging, target = tmp_path / "s", tmp_path / "t"
    staging.mkdir()
    target.write_text("data")
    stage(driver, vol.volume_id, str(staging), block_cap())
    try:
        code, _ = code_and_details(
            lambda: publish(driver, vol.volume_id, str(staging), str(target), cap=block_cap()))
        assert code == Code.FAILED_PRECONDITION
        assert target.read_text() == "data" and not mounted_at(target)
        target.unlink()
        publish(driver, vol.volume_id, str(staging), str(target), cap=block_cap())
        assert mounted_at(target)
        unpublish(driver, vol.volume_id, str(target))
        assert not os.path.lexists(target)
    finally:
        unstage(driver, vol.volume_id, str(staging))
        driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))


def test_a_staging_path_named_by_the_kubelet_dirs_other_name(tmp_path: Path) -> None:
    """--kubelet-dir may itself be a symlink (to a bigger disk): paths under either name work,
    and the symlink check starts beneath it."""
    from csi_driver import errors
    from csi_driver.node import paths

    real = tmp_path / "real"
    (real / "pods").mkdir(parents=True)
    alias = tmp_path / "kubelet"
    alias.symlink_to(real)
    root = paths.KubeletDir.of(str(alias))
    assert paths.check(f"{alias}/pods/x", "p", root) == f"{real}/pods/x"
    assert paths.check(f"{real}//pods/x/", "p", root) == f"{real}/pods/x"
    with pytest.raises(errors.InvalidArgument):
        paths.check(str(alias), "p", root)  # the kubelet directory itself is not a volume path
    with pytest.raises(errors.InvalidArgument):
        paths.check(f"{tmp_path}/kubeletx/pods", "p", root)
