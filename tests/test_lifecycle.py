"""The kubelet's sequence end to end with real mounts: create -> stage -> publish -> write ->
unpublish -> unstage -> (again, read back) -> delete, plus a driver restart in the middle."""

from __future__ import annotations

import os
from pathlib import Path

from csi_driver.csi import csi_pb2 as pb

from .conftest import needs_root
from .harness import Driver, MiB, mount_cap, mounted_at, start_driver, write_config
from .test_node import publish, stage, unpublish, unstage

pytestmark = needs_root


def test_full_lifecycle_keeps_data(driver: Driver, name: str, tmp_path: Path) -> None:
    vol = driver.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name, capacity_range=pb.CapacityRange(required_bytes=10 * MiB),
        volume_capabilities=[mount_cap()])).volume
    staging, target = tmp_path / "staging", tmp_path / "pod" / "mount"
    staging.mkdir()
    target.parent.mkdir()
    payload = os.urandom(MiB)
    for round_ in range(2):
        stage(driver, vol.volume_id, str(staging))
        publish(driver, vol.volume_id, str(staging), str(target))
        data = target / "data.bin"
        if round_ == 0:
            data.write_bytes(payload)
        else:
            assert data.read_bytes() == payload
        unpublish(driver, vol.volume_id, str(target))
        unstage(driver, vol.volume_id, str(staging))
        assert not mounted_at(staging) and not target.exists()
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    listed = driver.controller.ListVolumes(pb.ListVolumesRequest()).entries
    assert vol.volume_id not in {e.volume.volume_id for e in listed}


def test_restart_with_volume_still_mounted(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml",
                          {"local": {"type": "hostpath", "path": str(tmp_path / "data")}})
    d = start_driver(tmp_path, config)
    vol = d.controller.CreateVolume(pb.CreateVolumeRequest(
        name="survivor", volume_capabilities=[mount_cap()])).volume
    staging, target = tmp_path / "staging", tmp_path / "target"
    staging.mkdir()
    stage(d, vol.volume_id, str(staging))
    publish(d, vol.volume_id, str(staging), str(target))
    (target / "kept").write_text("yes")
    assert d.stop() == 0
    assert mounted_at(target), "a driver restart must not unmount volumes"

    d = start_driver(tmp_path, config)
    try:
        # Repeats after the restart find the existing mounts instead of stacking new ones.
        stage(d, vol.volume_id, str(staging))
        publish(d, vol.volume_id, str(staging), str(target))
        with open("/proc/self/mountinfo") as f:
            assert sum(line.split(" ")[4] == str(target) for line in f) == 1
        assert (target / "kept").read_text() == "yes"
        unpublish(d, vol.volume_id, str(target))
        unstage(d, vol.volume_id, str(staging))
        d.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
        assert not (tmp_path / "data" / "volumes" / vol.volume_id.split(":")[1]).exists()
    finally:
        assert d.stop() == 0
