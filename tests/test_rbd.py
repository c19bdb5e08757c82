"""The Ceph RBD backend against a real single-node Ceph cluster (started by tests/ceph), with the
fuse mounter attaching images on this host for real: data written, detached, re-attached, read.

krbd and rbd-nbd need kernel modules this machine does not have; their tests say so and skip.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver.csi import csi_pb2 as pb

from .ceph.cluster import CephCluster
from .conftest import needs_root, status_of
from .harness import Driver, MiB, block_cap, mount_cap, start_driver, write_config
from .test_node import publish, unpublish, unstage

pytestmark = needs_root
Src = pb.VolumeContentSource


def rbd_config(cluster: CephCluster, tmp: Path, **extra: object) -> Path:
    keyfile = tmp / "csi.key"
    keyfile.write_text(cluster.csi_key)
    backend = {"type": "rbd", "pool": cluster.pool, "monitors": [cluster.monitors],
               "mounter": "fuse", "nodeStateDir": str(tmp / "node"), "userID": cluster.csi_user,
               "userKeyFile": str(keyfile), "timeoutSeconds": 5, **extra}
    return write_config(tmp / "c.yaml", {"ceph": backend})


@pytest.fixture(scope="module")
def rbd(ceph_cluster: CephCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    tmp = tmp_path_factory.mktemp("rbd")
    d = start_driver(tmp, rbd_config(ceph_cluster, tmp, maxCloneDepth=3))
    d.cluster = ceph_cluster  # type: ignore[attr-defined]
    yield d
    assert d.stop() == 0


def secrets(cluster: CephCluster, key: str | None = None) -> dict[str, str]:
    return {"userID": cluster.csi_user, "userKey": cluster.csi_key if key is None else key}


def create(d: Driver, name: str, size: int = 64 * MiB, source: Src | None = None,
           cap: pb.VolumeCapability | None = None) -> pb.Volume:
    req = pb.CreateVolumeRequest(
        name=name, capacity_range=pb.CapacityRange(required_bytes=size),
        volume_capabilities=[cap or mount_cap()], secrets=secrets(d.cluster))  # type: ignore[attr-defined]
    if source is not None:
        req.volume_content_source.CopyFrom(source)
    return d.controller.CreateVolume(req).volume


def delete(d: Driver, volume_id: str) -> None:
    d.controller.DeleteVolume(pb.DeleteVolumeRequest(
        volume_id=volume_id, secrets=secrets(d.cluster)))  # type: ignore[attr-defined]


def snapshot(d: Driver, name: str, volume_id: str) -> pb.Snapshot:
    return d.controller.CreateSnapshot(pb.CreateSnapshotRequest(
        name=name, source_volume_id=volume_id,
        secrets=secrets(d.cluster))).snapshot  # type: ignore[attr-defined]


def delete_snapshot(d: Driver, snapshot_id: str) -> None:
    d.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(
        snapshot_id=snapshot_id, secrets=secrets(d.cluster)))  # type: ignore[attr-defined]


def rbd_stage(d: Driver, vid: str, staging: Path, cap: pb.VolumeCapability | None = None) -> None:
    d.node.NodeStageVolume(pb.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=str(staging), volume_capability=cap or mount_cap(),
        secrets=secrets(d.cluster)))  # type: ignore[attr-defined]


def images(cluster: CephCluster) -> list[str]:
    return sorted(json.loads(cluster.rbd("ls", "--format", "json", cluster.pool) or "[]"))


def record(cluster: CephCluster, image: str) -> dict[str, object]:
    """The driver's record of an image, as `rbd image-meta` shows it."""
    out = cluster.rbd("image-meta", "get", f"{cluster.pool}/{image}", "berth")
    return json.loads(out)  # type: ignore[no-any-return]


def trash(cluster: CephCluster, wait: float = 30) -> list[str]:
    """What is in the trash once the driver's background purger has had `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        listed = json.loads(cluster.rbd("trash", "ls", "--format", "json", cluster.pool) or "[]")
        if not listed or time.monotonic() > deadline:
            return sorted(t["name"] for t in listed)
        time.sleep(0.2)


def test_lifecycle_with_data_snapshot_restore_clone(rbd: Driver, tmp_path: Path) -> None:
    cluster: CephCluster = rbd.cluster  # type: ignore[attr-defined]
    vol = create(rbd, "pvc-data", 64 * MiB)
    assert create(rbd, "pvc-data", 64 * MiB) == vol
    assert status_of(lambda: create(rbd, "pvc-data", 128 * MiB)) == grpc.StatusCode.ALREADY_EXISTS
    staging, target = tmp_path / "staging", tmp_path / "target"
    staging.mkdir()
    rbd_stage(rbd, vol.volume_id, staging)
    publish(rbd, vol.volume_id, str(staging), str(target))
    (target / "file").write_text("at snapshot time")
    unpublish(rbd, vol.volume_id, str(target))
    unstage(rbd, vol.volume_id, str(staging))
    rbd_stage(rbd, vol.volume_id, staging)  # re-attached: the data is still there
    assert (staging / "file").read_text() == "at snapshot time"
    os.sync()
    t0 = time.monotonic()
    snap = snapshot(rbd, "snap-data", vol.volume_id)
    snap_seconds = time.monotonic() - t0
    assert snap.ready_to_use and snap.source_volume_id == vol.volume_id
    (staging / "file").write_text("after the snapshot")
    unstage(rbd, vol.volume_id, str(staging))
    restored = create(rbd, "pvc-restored", 128 * MiB,
                      Src(snapshot=Src.SnapshotSource(snapshot_id=snap.snapshot_id)))
    clone = create(rbd, "pvc-clone", 64 * MiB,
                   Src(volume=Src.VolumeSource(volume_id=vol.volume_id)))
    try:
        assert restored.capacity_bytes == 128 * MiB
        rbd_stage(rbd, restored.volume_id, staging)
        assert (staging / "file").read_text() == "at snapshot time"
        st = os.statvfs(staging)
        assert st.f_blocks * st.f_frsize > 96 * MiB  # grown into the larger volume
        unstage(rbd, restored.volume_id, str(staging))
        rbd_stage(rbd, clone.volume_id, staging)
        assert (staging / "file").read_text() == "after the snapshot"
        unstage(rbd, clone.volume_id, str(staging))
    finally:
        for v in (restored, clone, vol):
            delete(rbd, v.volume_id)
        delete_snapshot(rbd, snap.snapshot_id)
    assert images(cluster) == [] and trash(cluster) == []
    assert snap_seconds < 5


def test_delete_volume_with_snapshot_keeps_the_snapshot(rbd: Driver, tmp_path: Path) -> None:
    cluster: CephCluster = rbd.cluster  # type: ignore[attr-defined]
    vol = create(rbd, "pvc-parent")
    staging = tmp_path / "s"
    staging.mkdir()
    rbd_stage(rbd, vol.volume_id, staging)
    (staging / "keep").write_text("child data")
    unstage(rbd, vol.volume_id, str(staging))
    snap = snapshot(rbd, "snap-parent", vol.volume_id)
    delete(rbd, vol.volume_id)  # the snapshot still depends on it: to the trash, not lost
    assert not any(i.startswith("csi-vol-") for i in images(cluster))
    restored = create(rbd, "pvc-from-orphan",
                      source=Src(snapshot=Src.SnapshotSource(snapshot_id=snap.snapshot_id)))
    rbd_stage(rbd, restored.volume_id, staging)
    assert (staging / "keep").read_text() == "child data"
    unstage(rbd, restored.volume_id, str(staging))
    delete_snapshot(rbd, snap.snapshot_id)
    delete(rbd, restored.volume_id)
    assert images(cluster) == [] and trash(cluster) == []


def test_block_volume_and_online_expansion(rbd: Driver, tmp_path: Path) -> None:
    vol = create(rbd, "pvc-block", 32 * MiB, cap=block_cap())
    staging, target = tmp_path / "s", tmp_path / "dev"
    staging.mkdir()
    rbd_stage(rbd, vol.volume_id, staging, block_cap())
    publish(rbd, vol.volume_id, str(staging), str(target), cap=block_cap())
    try:
        fd = os.open(target, os.O_RDWR)
        os.pwrite(fd, b"block bytes", 5 * MiB)
        os.fsync(fd)
        os.close(fd)
        resp = rbd.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=48 * MiB),
            secrets=secrets(rbd.cluster)))  # type: ignore[attr-defined]
        assert resp.capacity_bytes == 48 * MiB and resp.node_expansion_required
        grown = rbd.node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
            volume_id=vol.volume_id, volume_path=str(target),
            capacity_range=pb.CapacityRange(required_bytes=48 * MiB)))
        assert grown.capacity_bytes == 48 * MiB
        fd = os.open(target, os.O_RDONLY)
        assert os.lseek(fd, 0, os.SEEK_END) == 48 * MiB
        assert os.pread(fd, 11, 5 * MiB) == b"block bytes"
        os.close(fd)
    finally:
        unpublish(rbd, vol.volume_id, str(target))
        unstage(rbd, vol.volume_id, str(staging))
        delete(rbd, vol.volume_id)


def test_xfs_grows_online(rbd: Driver, tmp_path: Path) -> None:
    cap = mount_cap(fs_type="xfs")
    vol = create(rbd, "pvc-xfs", 320 * MiB, cap=cap)
    staging, target = tmp_path / "s", tmp_path / "t"
    staging.mkdir()
    rbd_stage(rbd, vol.volume_id, staging, cap)
    publish(rbd, vol.volume_id, str(staging), str(target), cap=cap)
    try:
        before = os.statvfs(target).f_blocks * os.statvfs(target).f_frsize
        rbd.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=640 * MiB),
            secrets=secrets(rbd.cluster)))  # type: ignore[attr-defined]
        rbd.node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
            volume_id=vol.volume_id, volume_path=str(target),
            capacity_range=pb.CapacityRange(required_bytes=640 * MiB)))
        after = os.statvfs(target).f_blocks * os.statvfs(target).f_frsize
        assert after > before + 250 * MiB
        stats = rbd.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
            volume_id=vol.volume_id, volume_path=str(target)))
        assert not stats.volume_condition.abnormal
    finally:
        unpublish(rbd, vol.volume_id, str(target))
        unstage(rbd, vol.volume_id, str(staging))
        delete(rbd, vol.volume_id)


def test_delete_refused_while_attached(rbd: Driver, tmp_path: Path) -> None:
    vol = create(rbd, "pvc-busy", 16 * MiB)
    staging = tmp_path / "s"
    staging.mkdir()
    rbd_stage(rbd, vol.volume_id, staging)
    try:
        code = status_of(lambda: delete(rbd, vol.volume_id))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        unstage(rbd, vol.volume_id, str(staging))
    delete(rbd, vol.volume_id)


def test_clone_chains_are_flattened(rbd: Driver) -> None:
    cluster: CephCluster = rbd.cluster  # type: ignore[attr-defined]
    made = [create(rbd, "chain-0", 8 * MiB)]
    for i in range(1, 6):  # maxCloneDepth is 3 for this driver
        made.append(create(rbd, f"chain-{i}", 8 * MiB,
                           Src(volume=Src.VolumeSource(volume_id=made[-1].volume_id))))
    try:
        for i, v in enumerate(made):
            image = "csi-vol-" + v.volume_id.split(":", 1)[1]
            depth = record(cluster, image)["depth"]
            assert depth <= 3, f"chain-{i} is {depth} deep"
        # Depths go 0,1,2,3 then the 4th clone is flattened back to 0 and the chain restarts.
        depths = [record(cluster, "csi-vol-" + v.volume_id.split(":", 1)[1])["depth"]
                  for v in made]
        assert depths == [0, 1, 2, 3, 0, 1]
        flat = "csi-vol-" + made[4].volume_id.split(":", 1)[1]
        info = json.loads(cluster.rbd("info", "--format", "json", f"{cluster.pool}/{flat}"))
        assert "parent" not in info
    finally:
        for v in reversed(made):
            delete(rbd, v.volume_id)
    assert images(cluster) == [] and trash(cluster) == []


def test_qos_modify(rbd: Driver) -> None:
    cluster: CephCluster = rbd.cluster  # type: ignore[attr-defined]
    vol = create(rbd, "pvc-qos", 8 * MiB)
    try:
        rbd.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
            volume_id=vol.volume_id, mutable_parameters={"rbd_qos_iops_limit": "500"},
            secrets=secrets(cluster)))
        image = "csi-vol-" + vol.volume_id.split(":", 1)[1]
        value = cluster.rbd("image-meta", "get", f"{cluster.pool}/{image}",
                            "conf_rbd_qos_iops_limit").strip()
        assert value == "500"
        for bad in ({"rbd_qos_iops_limit": "fast"}, {"color": "blue"}):
            code = status_of(lambda b=bad: rbd.controller.ControllerModifyVolume(  # type: ignore[misc]
                pb.ControllerModifyVolumeRequest(volume_id=vol.volume_id, mutable_parameters=b,
                                                 secrets=secrets(cluster))))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        delete(rbd, vol.volume_id)


def test_list_get_and_capacity_use_configured_credentials(rbd: Driver) -> None:
    vols = [create(rbd, f"pvc-list-{i}", 8 * MiB) for i in range(3)]
    snap = snapshot(rbd, "snap-list", vols[0].volume_id)
    try:
        listed = rbd.controller.ListVolumes(pb.ListVolumesRequest(max_entries=2))
        rest = rbd.controller.ListVolumes(pb.ListVolumesRequest(starting_token=listed.next_token))
        ids = {e.volume.volume_id for e in [*listed.entries, *rest.entries]}
        assert ids == {v.volume_id for v in vols}
        got = rbd.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(
            volume_id=vols[1].volume_id))
        assert got.volume.capacity_bytes == 8 * MiB
        snaps = rbd.controller.ListSnapshots(pb.ListSnapshotsRequest(
            source_volume_id=vols[0].volume_id)).entries
        assert [s.snapshot.snapshot_id for s in snaps] == [snap.snapshot_id]
        cap = rbd.controller.GetCapacity(pb.GetCapacityRequest())
        assert cap.available_capacity > 0
        code = status_of(lambda: snapshot(rbd, "snap-list", vols[1].volume_id))
        assert code == grpc.StatusCode.ALREADY_EXISTS
    finally:
        delete_snapshot(rbd, snap.snapshot_id)
        for v in vols:
            delete(rbd, v.volume_id)


def test_missing_and_wrong_credentials(rbd: Driver) -> None:
    cluster: CephCluster = rbd.cluster  # type: ignore[attr-defined]
    req = pb.CreateVolumeRequest(name="pvc-nokey", volume_capabilities=[mount_cap()],
                                 secrets={"userID": "csi"})
    # No key in the request: the configured key belongs to the same user and is used.
    vol = rbd.controller.CreateVolume(req).volume
    delete(rbd, vol.volume_id)
    wrong = subprocess.run(["ceph-authtool", "--gen-print-key"], capture_output=True, text=True,
                           check=True).stdout.strip()  # well-formed, but not csi's
    not_cephx = base64.b64encode(b"\0" * 28).decode()  # base64, but not a cephx key
    for bad, code in ((wrong, grpc.StatusCode.PERMISSION_DENIED),
                      ("not-a-key", grpc.StatusCode.INVALID_ARGUMENT),
                      (not_cephx, grpc.StatusCode.INVALID_ARGUMENT)):
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            rbd.controller.CreateVolume(pb.CreateVolumeRequest(
                name="pvc-badkey", volume_capabilities=[mount_cap()],
                secrets={"userID": "csi", "userKey": bad}))
        assert err.value.code() == code
        assert "'csi'" in err.value.details() and bad not in err.value.details()
        assert time.monotonic() - t0 < 15
        assert bad not in rbd.log()
    with pytest.raises(grpc.RpcError) as err:
        rbd.controller.CreateVolume(pb.CreateVolumeRequest(
            name="pvc-nouser", volume_capabilities=[mount_cap()],
            secrets={"userID": "someone-else"}))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # no key for that user
    with pytest.raises(grpc.RpcError) as err:  # would reach CEPH_ARGS on a node
        rbd.controller.CreateVolume(pb.CreateVolumeRequest(
            name="pvc-inject", volume_capabilities=[mount_cap()],
            secrets={"userID": "csi --log-file /tmp/x", "userKey": cluster.csi_key}))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert cluster.csi_key not in rbd.log()


def test_monitors_down_is_unavailable_quickly(ceph_cluster: CephCluster, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    config = rbd_config(ceph_cluster, tmp_path, timeoutSeconds=3)
    text = config.read_text().replace(ceph_cluster.monitors, f"127.0.0.1:{dead}")
    config.write_text(text)
    d = start_driver(tmp_path, config)
    try:
        t0 = time.monotonic()
        code = status_of(lambda: d.controller.CreateVolume(pb.CreateVolumeRequest(
            name="x", volume_capabilities=[mount_cap()], secrets=secrets(ceph_cluster))))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - t0 < 12
        assert d.identity.Probe(pb.ProbeRequest()).ready.value is False
    finally:
        assert d.stop() == 0


def test_missing_pool_is_invalid_argument(ceph_cluster: CephCluster, tmp_path: Path) -> None:
    d = start_driver(tmp_path, rbd_config(ceph_cluster, tmp_path, pool="no-such-pool"))
    try:
        with pytest.raises(grpc.RpcError) as err:
            d.controller.CreateVolume(pb.CreateVolumeRequest(
                name="x", volume_capabilities=[mount_cap()], secrets=secrets(ceph_cluster)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no-such-pool" in err.value.details()
    finally:
        assert d.stop() == 0


def test_crash_in_create_volume_leaves_one_image(ceph_cluster: CephCluster,
                                                 tmp_path: Path) -> None:
    config = rbd_config(ceph_cluster, tmp_path)
    d = start_driver(tmp_path, config, env={"BERTH_FAULTS": "create-volume"})
    req = pb.CreateVolumeRequest(name="pvc-crash", volume_capabilities=[mount_cap()],
                                 capacity_range=pb.CapacityRange(required_bytes=8 * MiB),
                                 secrets=secrets(ceph_cluster))
    with pytest.raises(grpc.RpcError):
        d.controller.CreateVolume(req)
    assert d.proc.wait(10) < 0
    half = [i for i in images(ceph_cluster) if i.startswith("csi-vol-pvc-crash")]
    assert len(half) == 1, "the crash came after the image was made"
    d = start_driver(tmp_path, config)
    try:
        vol = d.controller.CreateVolume(req).volume
        assert [i for i in images(ceph_cluster) if i.startswith("csi-vol-pvc-crash")] == half
        assert record(ceph_cluster, half[0])["name"] == "pvc-crash"
        d.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id,
                                                         secrets=secrets(ceph_cluster)))
        assert not any(i.startswith("csi-vol-pvc-crash") for i in images(ceph_cluster))
    finally:
        assert d.stop() == 0


def test_stage_survives_driver_restart(ceph_cluster: CephCluster, tmp_path: Path) -> None:
    config = rbd_config(ceph_cluster, tmp_path)
    d = start_driver(tmp_path, config)
    d.cluster = ceph_cluster  # type: ignore[attr-defined]
    vol = create(d, "pvc-restart", 16 * MiB)
    staging = tmp_path / "s"
    staging.mkdir()
    rbd_stage(d, vol.volume_id, staging)
    (staging / "f").write_text("kept")
    assert d.stop() == 0
    d = start_driver(tmp_path, config)
    d.cluster = ceph_cluster  # type: ignore[attr-defined]
    try:
        rbd_stage(d, vol.volume_id, staging)  # finds the attachment instead of a second one
        fuse_dir = tmp_path / "node" / "fuse"
        assert len(list(fuse_dir.iterdir())) == 1
        assert (staging / "f").read_text() == "kept"
        unstage(d, vol.volume_id, str(staging))
        assert list(fuse_dir.iterdir()) == []
        delete(d, vol.volume_id)
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("mounter", [
    pytest.param("krbd", marks=pytest.mark.skipif(
        not os.path.isdir("/sys/bus/rbd"),
        reason="krbd needs the rbd kernel module, which this kernel lacks")),
    pytest.param("nbd", marks=pytest.mark.skipif(
        not os.path.exists("/sys/module/nbd"),
        reason="rbd-nbd needs the nbd kernel module, which this kernel lacks")),
])
def test_kernel_mounters(ceph_cluster: CephCluster, tmp_path: Path, mounter: str) -> None:
    d = start_driver(tmp_path, rbd_config(ceph_cluster, tmp_path, mounter=mounter))
    d.cluster = ceph_cluster  # type: ignore[attr-defined]
    try:
        vol = create(d, f"pvc-{mounter}", 16 * MiB)
        staging = tmp_path / "s"
        staging.mkdir()
        rbd_stage(d, vol.volume_id, staging)
        (staging / "f").write_text(mounter)
        unstage(d, vol.volume_id, str(staging))
        rbd_stage(d, vol.volume_id, staging)
        assert (staging / "f").read_text() == mounter
        unstage(d, vol.volume_id, str(staging))
        delete(d, vol.volume_id)
    finally:
        assert d.stop() == 0


def test_name_prefix_config_is_checked() -> None:
    from csi_driver.config import ConfigError, parse_settings

    base = {"type": "rbd", "pool": "p", "monitors": ["127.0.0.1:1"]}
    ok = parse_settings({"backends": {"c": base}}).backends["c"]
    assert (ok.volumeNamePrefix, ok.snapshotNamePrefix) == ("csi-vol-", "csi-snap-")  # type: ignore[attr-defined]
    for bad in ({"volumeNamePrefix": "a/b"}, {"snapshotNamePrefix": ""},
                {"volumeNamePrefix": "csi-", "snapshotNamePrefix": "csi-snap-"}):
        with pytest.raises(ConfigError) as err:
            parse_settings({"backends": {"c": {**base, **bad}}}, "c.yaml")
        assert "backends.c" in str(err.value)


@contextlib.contextmanager
def _admin_ioctx(cluster: CephCluster) -> Iterator[Any]:
    import rados

    with rados.Rados(rados_id="admin", conf=cluster.client_conf(cluster.admin_key())) as r, \
            r.open_ioctx(cluster.pool) as ctx:
        yield ctx


def _trash_entries(cluster: CephCluster) -> dict[str, str]:
    listed = json.loads(cluster.rbd("trash", "ls", "--format", "json", cluster.pool) or "[]")
    return {t["name"]: t["id"] for t in listed}


def test_purger_leaves_other_clients_trash_alone(ceph_cluster: CephCluster,
                                                 tmp_path: Path) -> None:
    """ceph-csi names its images csi-vol-<uuid> too: a trashed image of another client, with our
    prefix but without our record, survives a sweep that purges our own trashed image."""
    import rbd as librbd

    foreign = "csi-vol-00000000-1111-2222-3333-444444444444"
    with _admin_ioctx(ceph_cluster) as ctx:
        librbd.RBD().create(ctx, foreign, 8 * MiB, old_format=False, features=1)
        librbd.RBD().trash_move(ctx, foreign, 0)
    config = rbd_config(ceph_cluster, tmp_path, volumeNamePrefix="t-vol-")
    d = start_driver(tmp_path, config)
    d.cluster = ceph_cluster  # type: ignore[attr-defined]
    try:
        vol = create(d, "pvc-ours-in-trash", 8 * MiB)
        ours = "t-vol-" + vol.volume_id.split(":", 1)[1]
        assert ours in images(ceph_cluster)
        assert d.stop() == 0
        # As a crash right after the trash move would leave it: in the trash, no purge queued.
        ceph_cluster.rbd("trash", "mv", f"{ceph_cluster.pool}/{ours}")
        assert ours in _trash_entries(ceph_cluster)
        d = start_driver(tmp_path, config)  # its start-up sweep (config credentials) runs
        deadline = time.monotonic() + 30
        while ours in _trash_entries(ceph_cluster) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ours not in _trash_entries(ceph_cluster), "our own trashed image stayed"
        time.sleep(1)  # the sweep queued both at once: the foreign one had its chance
        assert foreign in _trash_entries(ceph_cluster)
        # And a prefix of ours alone is not enough either: the default-prefix driver too.
        assert d.stop() == 0
        d = start_driver(tmp_path, rbd_config(ceph_cluster, tmp_path))
        time.sleep(3)
        assert foreign in _trash_entries(ceph_cluster)
    finally:
        d.stop()
        iid = _trash_entries(ceph_cluster).get(foreign)
        if iid:
            ceph_cluster.rbd("trash", "rm", f"{ceph_cluster.pool}/{iid}")


@pytest.mark.parametrize("config_credentials", [True, False])
def test_purge_resumes_after_kill(ceph_cluster: CephCluster, tmp_path: Path,
                                  config_credentials: bool) -> None:
    """Layering-only 10 GiB images take the purger about a second each (every possible object is
    removed): a kill -9 right after the deletes leaves them in the trash, and the restarted
    driver empties it: at once with the config's credentials; without those, once a request
    brings credentials."""
    config = rbd_config(ceph_cluster, tmp_path)
    if not config_credentials:
        backend = {"type": "rbd", "pool": ceph_cluster.pool, "monitors": [ceph_cluster.monitors],
                   "mounter": "fuse", "nodeStateDir": str(tmp_path / "node"),
                   "timeoutSeconds": 5}
        config = write_config(tmp_path / "c.yaml", {"ceph": backend})
    d = start_driver(tmp_path, config)
    vols = [d.controller.CreateVolume(pb.CreateVolumeRequest(
        name=f"pvc-big-{i}", capacity_range=pb.CapacityRange(required_bytes=10 << 30),
        parameters={"imageFeatures": "layering"}, volume_capabilities=[mount_cap()],
        secrets=secrets(ceph_cluster))).volume for i in range(6)]
    for v in vols:
        d.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id,
                                                         secrets=secrets(ceph_cluster)))
    d.stop(signal.SIGKILL)
    left = trash(ceph_cluster, wait=0)
    assert left, "the purge was over before the kill: the test proves nothing"
    d = start_driver(tmp_path, config)
    d.cluster = ceph_cluster  # type: ignore[attr-defined]
    try:
        if not config_credentials:
            time.sleep(3)
            assert trash(ceph_cluster, wait=0) == left  # nothing to purge them with yet
            delete(d, create(d, "pvc-brings-secrets", 8 * MiB).volume_id)
        assert trash(ceph_cluster, wait=60) == []
        assert not any(i.startswith("csi-vol-pvc-big") for i in images(ceph_cluster))
    finally:
        assert d.stop() == 0


def test_delete_right_after_unstage(rbd: Driver, tmp_path: Path) -> None:
    """Unstage returns once rbd-fuse has exited and dropped its watch, so the DeleteVolume the
    CO sends at once is never refused as still attached."""
    staging = tmp_path / "s"
    staging.mkdir()
    cluster: CephCluster = rbd.cluster  # type: ignore[attr-defined]
    for i in range(10):
        vol = create(rbd, f"pvc-quick-{i}", 16 * MiB)
        image = "csi-vol-" + vol.volume_id.split(":", 1)[1]
        rbd_stage(rbd, vol.volume_id, staging)
        assert _fuse_processes(image)
        unstage(rbd, vol.volume_id, str(staging))
        assert _fuse_processes(image) == [], "unstage returned with rbd-fuse still running"
        delete(rbd, vol.volume_id)
    assert not any(i.startswith("csi-vol-pvc-quick") for i in images(cluster))


def _fuse_processes(image: str) -> list[int]:
    """rbd-fuse processes serving `image` (and not yet exited: zombies show no command line)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0] == b"rbd-fuse" and image.encode() in argv:
            found.append(int(pid))
    return found


def test_default_features_have_an_object_map(rbd: Driver) -> None:
    """With an object map a purge removes only the objects an image has (fast), without one
    every object it could have; a StorageClass can still ask for layering alone."""
    cluster: CephCluster = rbd.cluster  # type: ignore[attr-defined]
    full = create(rbd, "pvc-features", 8 * MiB)
    plain = rbd.controller.CreateVolume(pb.CreateVolumeRequest(
        name="pvc-layering", volume_capabilities=[mount_cap()],
        parameters={"imageFeatures": "layering"}, secrets=secrets(cluster))).volume
    try:
        def features(v: pb.Volume) -> set[str]:
            image = "csi-vol-" + v.volume_id.split(":", 1)[1]
            info = json.loads(cluster.rbd("info", "--format", "json", f"{cluster.pool}/{image}"))
            return set(info["features"])

        assert features(full) == {"layering", "exclusive-lock", "object-map", "fast-diff"}
        assert features(plain) == {"layering"}
    finally:
        delete(rbd, full.volume_id)
        delete(rbd, plain.volume_id)


def test_attach_holds_a_single_node_image_to_one_node(rbd: Driver,
                                                      ceph_cluster: CephCluster) -> None:
    """ControllerPublish for RBD: the node is recorded in the image's metadata, a second node
    of a single-node volume is refused (ceph-csi lets both map it), nodes register as objects
    in the pool at NodeGetInfo, and a published image is not deleted."""
    caps = {c.rpc.type for c in rbd.controller.ControllerGetCapabilities(
        pb.ControllerGetCapabilitiesRequest()).capabilities}
    assert pb.ControllerServiceCapability.RPC.PUBLISH_UNPUBLISH_VOLUME in caps
    here = rbd.node.NodeGetInfo(pb.NodeGetInfoRequest()).node_id

    def rados(*args: str) -> str:
        return subprocess.run(
            ["rados", "--conf", str(ceph_cluster.conf), "--name", "client.admin", "--keyring",
             str(ceph_cluster.admin_keyring), "-p", ceph_cluster.pool, *args],
            capture_output=True, text=True, timeout=30, check=True).stdout

    assert f"berth.node.{here}" in rados("ls").split()
    rados("create", "berth.node.node-b")  # as node-b's NodeGetInfo would
    vol = create(rbd, "pvc-attach", 16 * MiB)
    cap = mount_cap()
    sec = secrets(rbd.cluster)  # type: ignore[attr-defined]

    def publish_to(node: str, readonly: bool = False) -> grpc.StatusCode:
        return status_of(lambda: rbd.controller.ControllerPublishVolume(
            pb.ControllerPublishVolumeRequest(volume_id=vol.volume_id, node_id=node,
                                              volume_capability=cap, readonly=readonly,
                                              secrets=sec)))

    def unpublish_from(node: str) -> grpc.StatusCode:
        return status_of(lambda: rbd.controller.ControllerUnpublishVolume(
            pb.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id, node_id=node,
                                                secrets=sec)))

    assert publish_to("some-fake-node-id") == grpc.StatusCode.NOT_FOUND
    assert publish_to(here) == grpc.StatusCode.OK
    assert publish_to(here) == grpc.StatusCode.OK
    assert publish_to(here, readonly=True) == grpc.StatusCode.ALREADY_EXISTS
    assert publish_to("node-b") == grpc.StatusCode.FAILED_PRECONDITION
    image = vol.volume_context["image"]
    meta = ceph_cluster.rbd("image-meta", "get", f"{ceph_cluster.pool}/{image}", "berth.attach")
    assert list(json.loads(meta)) == [here]
    assert status_of(lambda: delete(rbd, vol.volume_id)) == grpc.StatusCode.FAILED_PRECONDITION
    assert unpublish_from("some-fake-node-id") == grpc.StatusCode.OK
    assert unpublish_from(here) == grpc.StatusCode.OK
    assert publish_to("node-b") == grpc.StatusCode.OK
    assert unpublish_from("") == grpc.StatusCode.OK
    delete(rbd, vol.volume_id)
    rados("rm", "berth.node.node-b")
