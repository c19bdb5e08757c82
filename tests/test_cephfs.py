"""The CephFS backend against the session's real Ceph with an MDS (tests/ceph/filesystem.py):
subvolumes through the mgr volumes module, ceph-fuse mounts on this host, two node processes
sharing one volume, quotas enforced, snapshots, restores and clones with real data.

The kernel mounter needs the ceph kernel module, which this machine lacks: its test says so and
skips. Files on FUSE mounts are only ever touched from a child process with a hard timeout: a
CephFS whose MDS is gone hangs its callers in D state.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver.csi import csi_pb2 as pb
from csi_driver.ids import local_id_for_name

from .ceph.filesystem import Filesystem
from .conftest import needs_root
from .harness import Driver, MiB, mount_cap, start_driver, write_config

pytestmark = needs_root
Src = pb.VolumeContentSource
Mode = pb.VolumeCapability.AccessMode.Mode
Code = grpc.StatusCode
NODE_2 = "cephfs-node-2"


def backend_config(fs: Filesystem, tmp: Path, **extra: object) -> dict[str, object]:
    keyfile = tmp / "csifs.key"
    keyfile.write_text(fs.key)
    return {"type": "cephfs", "monitors": [fs.cluster.monitors], "fsName": fs.name,
            "subvolumeGroup": fs.group, "mounter": "fuse", "nodeStateDir": str(tmp / "node"),
            "userID": fs.user, "userKeyFile": str(keyfile), "timeoutSeconds": 5, **extra}


def secrets(fs: Filesystem, key: str | None = None) -> dict[str, str]:
    return {"userID": fs.user, "userKey": fs.key if key is None else key}


@pytest.fixture(scope="module")
def fsd(cephfs: Filesystem, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    tmp = tmp_path_factory.mktemp("cephfs")
    d = start_driver(tmp, write_config(tmp / "c.yaml", {"fs": backend_config(cephfs, tmp)}))
    d.fs = cephfs  # type: ignore[attr-defined]
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture(scope="module")
def node2(cephfs: Filesystem, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    """A second node: its own process, node ID and state directory."""
    tmp = tmp_path_factory.mktemp("cephfs-node2")
    d = start_driver(tmp, write_config(tmp / "c.yaml", {"fs": backend_config(cephfs, tmp)}),
                     "--node-id", NODE_2, "--mode", "node")
    yield d
    assert d.stop() == 0, d.log()


def fs_of(d: Driver) -> Filesystem:
    return d.fs  # type: ignore[attr-defined, no-any-return]


def create(d: Driver, name: str, size: int = 64 * MiB, source: Src | None = None,
           mode: int = Mode.MULTI_NODE_MULTI_WRITER, **params: str) -> pb.Volume:
    req = pb.CreateVolumeRequest(
        name=name, capacity_range=pb.CapacityRange(required_bytes=size),
        volume_capabilities=[mount_cap(mode)], secrets=secrets(fs_of(d)), parameters=params)
    if source is not None:
        req.volume_content_source.CopyFrom(source)
    return d.controller.CreateVolume(req, timeout=60).volume


def create_ready(d: Driver, name: str, source: Src, wait: float = 60,
                 request: pb.CreateVolumeRequest | None = None) -> pb.Volume:
    """CreateVolume from a source, retried while it answers ABORTED (the clone is copying)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            if request is not None:
                return d.controller.CreateVolume(request, timeout=60).volume
            return create(d, name, source=source)
        except grpc.RpcError as exc:
            if exc.code() != Code.ABORTED or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def delete(d: Driver, volume_id: str) -> None:
    d.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id,
                                                     secrets=secrets(fs_of(d))), timeout=60)


def snapshot(d: Driver, name: str, volume_id: str) -> pb.Snapshot:
    return d.controller.CreateSnapshot(pb.CreateSnapshotRequest(
        name=name, source_volume_id=volume_id, secrets=secrets(fs_of(d))), timeout=60).snapshot


def delete_snapshot(d: Driver, snapshot_id: str) -> None:
    d.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(
        snapshot_id=snapshot_id, secrets=secrets(fs_of(d))), timeout=60)


def stage(d: Driver, vol: pb.Volume, staging: Path, mode: int = Mode.MULTI_NODE_MULTI_WRITER,
          key: str | None = None, fs: Filesystem | None = None) -> None:
    staging.mkdir(parents=True, exist_ok=True)
    d.node.NodeStageVolume(pb.NodeStageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=str(staging),
        volume_capability=mount_cap(mode), volume_context=vol.volume_context,
        secrets=secrets(fs or fs_of(d), key)), timeout=60)


def unstage(d: Driver, vol: pb.Volume, staging: Path) -> None:
    d.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=str(staging)), timeout=60)


def publish(d: Driver, vol: pb.Volume, staging: Path, target: Path, readonly: bool = False,
            mode: int = Mode.MULTI_NODE_MULTI_WRITER) -> None:
    d.node.NodePublishVolume(pb.NodePublishVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=str(staging), target_path=str(target),
        volume_capability=mount_cap(mode), readonly=readonly,
        volume_context=vol.volume_context), timeout=60)


def unpublish(d: Driver, vol: pb.Volume, target: Path) -> None:
    d.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(
        volume_id=vol.volume_id, target_path=str(target)), timeout=60)


def sh(script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A shell in a child with a hard timeout: FUSE access never blocks the test process."""
    return subprocess.run(["timeout", "-s", "KILL", str(int(timeout)), "sh", "-c", script],
                          capture_output=True, text=True, timeout=timeout + 10, check=False)


def ok(script: str, timeout: float = 60) -> str:
    done = sh(script, timeout)
    assert done.returncode == 0, (script, done.stdout, done.stderr)
    return done.stdout


def subvolume(d: Driver, vol_or_id: pb.Volume | str) -> str:
    vid = vol_or_id if isinstance(vol_or_id, str) else vol_or_id.volume_id
    return "csi-vol-" + vid.split(":", 1)[1]


def records(fs: Filesystem) -> list[str]:
    """Berth's record objects in the metadata pool."""
    out = fs.cluster.ceph("osd", "pool", "ls")
    assert f"cephfs.{fs.name}.meta" in out
    listed = subprocess.run(
        ["rados", "--conf", str(fs.cluster.conf), "--name", "client.admin",
         "--keyring", str(fs.cluster.admin_keyring), "-p", f"cephfs.{fs.name}.meta",
         "-N", f"berth.{fs.group}", "ls"], capture_output=True, text=True, timeout=60,
        check=True).stdout
    return sorted(listed.split())


# -- the lifecycle --------------------------------------------------------------------------
def test_two_nodes_share_a_volume_with_its_quota(fsd: Driver, node2: Driver,
                                                   tmp_path: Path) -> None:
    fs = fs_of(fsd)
    vol = create(fsd, "pvc-shared", 40 * MiB)
    assert vol.capacity_bytes == 40 * MiB
    assert create(fsd, "pvc-shared", 40 * MiB) == vol  # idempotent
    assert subvolume(fsd, vol) in fs.subvolumes()
    info = fs.info(subvolume(fsd, vol))
    assert info["bytes_quota"] == 40 * MiB
    s1, s2, t1, t2 = (tmp_path / n for n in ("s1", "s2", "t1", "t2"))
    stage(fsd, vol, s1)
    stage(fsd, vol, s1)  # idempotent
    stage(node2, vol, s2, fs=fs)
    publish(fsd, vol, s1, t1)
    publish(node2, vol, s2, t2)
    ok(f"dd if=/dev/urandom of={t1}/data bs=1M count=8 conv=fsync 2>/dev/null; "
       f"md5sum {t1}/data > {tmp_path}/sum")
    theirs = ok(f"md5sum {t2}/data").split()[0]
    assert theirs == (tmp_path / "sum").read_text().split()[0]
    ok(f"echo from-two > {t2}/note && sync")
    assert ok(f"cat {t1}/note").strip() == "from-two"

    # The quota is the size, reported exactly and enforced (with the client's slack).
    stats = fsd.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
        volume_id=vol.volume_id, volume_path=str(t1)), timeout=30)
    by_unit = {u.unit: u for u in stats.usage}
    assert by_unit[pb.VolumeUsage.BYTES].total == 40 * MiB
    assert 8 * MiB <= by_unit[pb.VolumeUsage.BYTES].used <= 9 * MiB
    assert pb.VolumeUsage.INODES not in by_unit  # ceph-fuse has no inode figures to give
    assert not stats.volume_condition.abnormal
    # CephFS clients enforce quotas from statistics the MDS hands out lazily: a write stops
    # some MiB late (2-25 MiB over a 40 MiB quota seen here with two clients mounted).
    full = sh(f"dd if=/dev/zero of={t1}/fill bs=1M count=200 conv=fsync", timeout=60)
    assert full.returncode != 0 and ("quota" in full.stderr.lower()
                                     or "space" in full.stderr.lower()), full.stderr
    written = int(ok(f"stat -c %s {t1}/fill"))
    assert written <= 2 * 40 * MiB, "the quota let a pod write twice the volume's size"

    # Expansion grows the quota online, with nothing for the node to do.
    grown = fsd.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=128 * MiB),
        secrets=secrets(fs)), timeout=30)
    assert grown.capacity_bytes == 128 * MiB and not grown.node_expansion_required
    ok(f"rm -f {t1}/fill; dd if=/dev/zero of={t1}/more bs=1M count=60 conv=fsync 2>/dev/null")

    for d, target, staging in ((fsd, t1, s1), (node2, t2, s2)):
        unpublish(d, vol, target)
        unstage(d, vol, staging)
        unstage(d, vol, staging)  # idempotent
        assert fs.cluster  # keep the reference
        assert "ceph-fuse" not in ok(f"grep -F ' {staging} ' /proc/self/mountinfo || true")
    delete(fsd, vol.volume_id)
    delete(fsd, vol.volume_id)  # idempotent
    assert subvolume(fsd, vol) not in fs.subvolumes()
    assert not [r for r in records(fs) if vol.volume_id.split(":")[1] in r]


def test_same_name_other_size_is_already_exists(fsd: Driver) -> None:
    vol = create(fsd, "pvc-size", 8 * MiB)
    try:
        with pytest.raises(grpc.RpcError) as err:
            create(fsd, "pvc-size", 16 * MiB)
        assert err.value.code() == Code.ALREADY_EXISTS
        assert fs_of(fsd).info(subvolume(fsd, vol))["bytes_quota"] == 8 * MiB  # untouched
    finally:
        delete(fsd, vol.volume_id)


def test_snapshot_restore_and_clone_show_the_data_as_it_was(fsd: Driver, tmp_path: Path
                                                             ) -> None:
    fs = fs_of(fsd)
    vol = create(fsd, "pvc-src", 64 * MiB)
    s, t = tmp_path / "s", tmp_path / "t"
    stage(fsd, vol, s)
    publish(fsd, vol, s, t)
    ok(f"mkdir {t}/d && echo first > {t}/d/f && ln -s d/f {t}/link && sync")
    snap = snapshot(fsd, "snap-1", vol.volume_id)
    assert snap.ready_to_use and snap.source_volume_id == vol.volume_id
    assert snapshot(fsd, "snap-1", vol.volume_id) == snap  # idempotent
    ok(f"echo second > {t}/d/f && sync")
    restored = create_ready(fsd, "pvc-restored", Src(snapshot=Src.SnapshotSource(
        snapshot_id=snap.snapshot_id)))
    cloned = create_ready(fsd, "pvc-cloned", Src(volume=Src.VolumeSource(
        volume_id=vol.volume_id)))
    assert restored.content_source.snapshot.snapshot_id == snap.snapshot_id
    assert cloned.capacity_bytes == 64 * MiB
    for v, want in ((restored, "first"), (cloned, "second")):
        vs, vt = tmp_path / f"s-{v.volume_id[-6:]}", tmp_path / f"t-{v.volume_id[-6:]}"
        stage(fsd, v, vs)
        publish(fsd, v, vs, vt)
        assert ok(f"cat {vt}/d/f").strip() == want
        assert ok(f"readlink {vt}/link").strip() == "d/f"
        unpublish(fsd, v, vt)
        unstage(fsd, v, vs)
    # The clone's temporary snapshot is gone once the clone is complete.
    assert fs.snapshots(subvolume(fsd, vol)) == [f"csi-snap-{snap.snapshot_id.split(':')[1]}"]
    listed = fsd.controller.ListSnapshots(pb.ListSnapshotsRequest(
        source_volume_id=vol.volume_id, secrets=secrets(fs)), timeout=30)
    assert [e.snapshot.snapshot_id for e in listed.entries] == [snap.snapshot_id]
    unpublish(fsd, vol, t)
    unstage(fsd, vol, s)

    # Deleting the volume keeps its snapshot restorable; the last snapshot takes the rest.
    delete(fsd, vol.volume_id)
    later = create_ready(fsd, "pvc-after-delete", Src(snapshot=Src.SnapshotSource(
        snapshot_id=snap.snapshot_id)))
    ls, lt = tmp_path / "ls", tmp_path / "lt"
    stage(fsd, later, ls)
    publish(fsd, later, ls, lt)
    assert ok(f"cat {lt}/d/f").strip() == "first"
    unpublish(fsd, later, lt)
    unstage(fsd, later, ls)
    delete_snapshot(fsd, snap.snapshot_id)
    delete_snapshot(fsd, snap.snapshot_id)  # idempotent
    for v in (restored, cloned, later):
        delete(fsd, v.volume_id)
    names = {subvolume(fsd, v) for v in (vol, restored, cloned, later)}
    deadline = time.monotonic() + 20
    while names & set(fs.subvolumes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not names & set(fs.subvolumes()), "a subvolume, snapshot or clone stayed behind"
    assert records(fs) == [] or all(not r.startswith(("vol.pvc-src", "snap.snap-1"))
                                    for r in records(fs))


def test_snapshot_name_is_global(fsd: Driver) -> None:
    a, b = create(fsd, "pvc-a"), create(fsd, "pvc-b")
    try:
        snap = snapshot(fsd, "shared-name", a.volume_id)
        with pytest.raises(grpc.RpcError) as err:
            snapshot(fsd, "shared-name", b.volume_id)
        assert err.value.code() == Code.ALREADY_EXISTS
        delete_snapshot(fsd, snap.snapshot_id)
    finally:
        delete(fsd, a.volume_id)
        delete(fsd, b.volume_id)


def test_restore_of_a_snapshot_taken_mid_write_is_consistent(fsd: Driver, tmp_path: Path
                                                              ) -> None:
    vol = create(fsd, "pvc-busy", 64 * MiB)
    s, t = tmp_path / "s", tmp_path / "t"
    stage(fsd, vol, s)
    publish(fsd, vol, s, t)
    # Files 0, 1, 2, ... each written whole (8,000 lines of its own number) before the next.
    writer = subprocess.Popen(
        ["timeout", "-s", "KILL", "60", "sh", "-c",
         f"i=0; while [ $i -lt 400 ]; do yes $i | head -n 8000 > {t}/f$i; i=$((i+1)); done"])
    try:
        time.sleep(0.5)
        snap = snapshot(fsd, "snap-busy", vol.volume_id)
    finally:
        writer.wait(70)
    restored = create_ready(fsd, "pvc-busy-restored", Src(snapshot=Src.SnapshotSource(
        snapshot_id=snap.snapshot_id)))
    rs, rt = tmp_path / "rs", tmp_path / "rt"
    stage(fsd, restored, rs)
    publish(fsd, restored, rs, rt)
    names = ok(f"ls {rt}").split()
    numbers = sorted(int(n[1:]) for n in names)
    assert numbers and numbers == list(range(len(numbers))), "the tree has gaps"
    assert len(numbers) < 400, "the snapshot came after the writer finished"
    for n in numbers[:-1]:  # every file but the one being written is whole
        assert ok(f"wc -l < {rt}/f{n}").strip() == "8000", n
        assert ok(f"sort -u {rt}/f{n}").strip() == str(n)
    for v, st, tt in ((restored, rs, rt), (vol, s, t)):
        unpublish(fsd, v, tt)
        unstage(fsd, v, st)
    delete(fsd, restored.volume_id)
    delete_snapshot(fsd, snap.snapshot_id)
    delete(fsd, vol.volume_id)


def test_read_only_many(fsd: Driver, tmp_path: Path) -> None:
    vol = create(fsd, "pvc-rox", mode=Mode.MULTI_NODE_READER_ONLY)
    s, t = tmp_path / "s", tmp_path / "t"
    try:
        stage(fsd, vol, s, mode=Mode.MULTI_NODE_READER_ONLY)
        publish(fsd, vol, s, t, readonly=True, mode=Mode.MULTI_NODE_READER_ONLY)
        done = sh(f"touch {t}/x")
        assert done.returncode != 0 and "read-only" in done.stderr.lower(), done.stderr
        unpublish(fsd, vol, t)
        unstage(fsd, vol, s)
    finally:
        delete(fsd, vol.volume_id)


def test_modify_pins_the_subvolume_and_get_volume_reports_it(fsd: Driver, tmp_path: Path
                                                              ) -> None:
    fs = fs_of(fsd)
    vol, other = create(fsd, "pvc-pin"), create(fsd, "pvc-pin-other")
    try:
        fsd.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
            volume_id=vol.volume_id, mutable_parameters={"exportPin": "0"},
            secrets=secrets(fs)), timeout=30)
        # The pin is on the subvolume's own directory, above the data path that nodes mount.
        base = os.path.dirname(vol.volume_context["subvolumePath"])
        assert fs.getxattr(base, "ceph.dir.pin") == "0"
        # A clone made with the parameter gets it too.
        req = pb.CreateVolumeRequest(name="pvc-pin-clone", volume_capabilities=[mount_cap()],
                                     secrets=secrets(fs), mutable_parameters={"exportPin": "0"},
                                     capacity_range=pb.CapacityRange(required_bytes=64 * MiB))
        req.volume_content_source.volume.volume_id = other.volume_id
        clone = create_ready(fsd, "pvc-pin-clone", req.volume_content_source, request=req)
        assert fs.getxattr(os.path.dirname(clone.volume_context["subvolumePath"]),
                           "ceph.dir.pin") == "0"
        delete(fsd, clone.volume_id)
        with pytest.raises(grpc.RpcError) as err:
            fsd.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
                volume_id=vol.volume_id, mutable_parameters={"exportPin": "fast"},
                secrets=secrets(fs)), timeout=30)
        assert err.value.code() == Code.INVALID_ARGUMENT
        got_vol = fsd.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(
            volume_id=vol.volume_id), timeout=30)
        assert got_vol.volume.volume_id == vol.volume_id
        assert not got_vol.status.volume_condition.abnormal
        listed = fsd.controller.ListVolumes(pb.ListVolumesRequest(max_entries=1), timeout=30)
        assert len(listed.entries) == 1 and listed.next_token
        rest = fsd.controller.ListVolumes(pb.ListVolumesRequest(
            starting_token=listed.next_token), timeout=30)
        assert {e.volume.volume_id for e in (*listed.entries, *rest.entries)} >= {
            vol.volume_id, other.volume_id}
    finally:
        delete(fsd, vol.volume_id)
        delete(fsd, other.volume_id)


def test_capacity_and_data_pool(fsd: Driver) -> None:
    fs = fs_of(fsd)
    cap = fsd.controller.GetCapacity(pb.GetCapacityRequest(), timeout=30)
    assert cap.available_capacity > 1 << 30
    vol = create(fsd, "pvc-pool", pool=fs.data_pool)
    try:
        assert fs.info(subvolume(fsd, vol))["data_pool"] == fs.data_pool
        with pytest.raises(grpc.RpcError) as err:
            create(fsd, "pvc-nopool", pool="no-such-pool")
        assert err.value.code() == Code.INVALID_ARGUMENT
        assert "pool" in (err.value.details() or "")
    finally:
        delete(fsd, vol.volume_id)


# -- bad input and faults -------------------------------------------------------------------
def test_wrong_key_is_permission_denied_naming_the_user(fsd: Driver, tmp_path: Path) -> None:
    fs = fs_of(fsd)
    other = fs.cluster.ceph("auth", "get-or-create-key", "client.other-cephfs").strip()
    req = pb.CreateVolumeRequest(name="pvc-wrong-key", volume_capabilities=[mount_cap()],
                                 secrets={"userID": fs.user, "userKey": other})
    with pytest.raises(grpc.RpcError) as err:
        fsd.controller.CreateVolume(req, timeout=30)
    assert err.value.code() == Code.PERMISSION_DENIED
    assert fs.user in (err.value.details() or "") and other not in (err.value.details() or "")
    req.secrets["userKey"] = "not-a-key"
    with pytest.raises(grpc.RpcError) as err:
        fsd.controller.CreateVolume(req, timeout=30)
    assert err.value.code() == Code.INVALID_ARGUMENT
    # The node refuses a mount with the wrong key too.
    vol = create(fsd, "pvc-node-key")
    try:
        with pytest.raises(grpc.RpcError) as err:
            stage(fsd, vol, tmp_path / "s", key=other)
        assert err.value.code() == Code.PERMISSION_DENIED, err.value.details()
        assert "ceph-fuse" not in ok(f"grep -F ' {tmp_path}/s ' /proc/self/mountinfo || true")
        assert other not in fsd.log()
    finally:
        delete(fsd, vol.volume_id)


def test_forged_context_and_flags_are_refused(fsd: Driver, tmp_path: Path) -> None:
    vol, other = create(fsd, "pvc-forged"), create(fsd, "pvc-forged-other")
    try:
        own = vol.volume_context["subvolumePath"]
        for path in ("/", "/volumes/csi/../..", "/volumes/other/x/y", "/etc",
                     other.volume_context["subvolumePath"], os.path.dirname(own) + "/.",
                     os.path.dirname(own) + "/.meta", own + ",suid"):
            forged = pb.Volume()
            forged.CopyFrom(vol)
            forged.volume_context["subvolumePath"] = path
            with pytest.raises(grpc.RpcError) as err:
                stage(fsd, forged, tmp_path / "s")
            assert err.value.code() == Code.INVALID_ARGUMENT, path
        forged = pb.Volume()
        forged.CopyFrom(vol)
        forged.volume_context["fsName"] = "cephfs,name=admin"
        with pytest.raises(grpc.RpcError) as err:
            stage(fsd, forged, tmp_path / "s")
        assert err.value.code() == Code.INVALID_ARGUMENT
        # Mount flags may not set what tells the mount apart (or the credentials).
        (tmp_path / "s").mkdir(exist_ok=True)
        for flag in (f"fsname=berth:{other.volume_context['subvolumePath']}", "subtype=x",
                     "secretfile=/etc/shadow"):
            cap = mount_cap(Mode.MULTI_NODE_MULTI_WRITER, flags=(flag,))
            with pytest.raises(grpc.RpcError) as err:
                fsd.node.NodeStageVolume(pb.NodeStageVolumeRequest(
                    volume_id=vol.volume_id, staging_target_path=str(tmp_path / "s"),
                    volume_capability=cap, volume_context=vol.volume_context,
                    secrets=secrets(fs_of(fsd))), timeout=30)
            assert err.value.code() == Code.INVALID_ARGUMENT, flag
        assert "ceph-fuse" not in ok(f"grep -F ' {tmp_path}/s ' /proc/self/mountinfo || true")
    finally:
        delete(fsd, vol.volume_id)
        delete(fsd, other.volume_id)


def test_missing_filesystem_and_dead_monitors(cephfs: Filesystem, tmp_path: Path) -> None:
    config = {"nofs": backend_config(cephfs, tmp_path, fsName="nofs"),
              "dead": backend_config(cephfs, tmp_path, monitors=["127.0.0.1:1"],
                                     timeoutSeconds=2)}
    d = start_driver(tmp_path, write_config(tmp_path / "c.yaml", config))
    try:
        req = pb.CreateVolumeRequest(name="pvc-x", volume_capabilities=[mount_cap()],
                                     secrets=secrets(cephfs), parameters={"backend": "nofs"})
        with pytest.raises(grpc.RpcError) as err:
            d.controller.CreateVolume(req, timeout=30)
        assert err.value.code() == Code.INVALID_ARGUMENT
        assert "nofs" in (err.value.details() or "")
        req.parameters["backend"] = "dead"
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            d.controller.CreateVolume(req, timeout=30)
        assert err.value.code() == Code.UNAVAILABLE
        assert time.monotonic() - t0 < 10
    finally:
        assert d.stop() == 0, d.log()


def test_a_missing_group_is_created(cephfs: Filesystem, tmp_path: Path) -> None:
    d = start_driver(tmp_path, write_config(tmp_path / "c.yaml", {
        "g": backend_config(cephfs, tmp_path, subvolumeGroup="berth-extra")}))
    try:
        vol = d.controller.CreateVolume(pb.CreateVolumeRequest(
            name="pvc-g", volume_capabilities=[mount_cap()], secrets=secrets(cephfs)),
            timeout=30).volume
        groups = [g["name"] for g in cephfs.cluster.ceph_json(
            "fs", "subvolumegroup", "ls", cephfs.name)]
        assert "berth-extra" in groups
        assert vol.volume_context["subvolumePath"].startswith("/volumes/berth-extra/")
        d.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id,
                                                         secrets=secrets(cephfs)), timeout=30)
    finally:
        assert d.stop() == 0, d.log()


def _crash(cephfs: Filesystem, tmp: Path, fault: str, call: object) -> None:
    tmp.mkdir()
    d = start_driver(tmp, write_config(tmp / "c.yaml", {"fs": backend_config(cephfs, tmp)}),
                     env={"BERTH_FAULTS": fault})
    d.fs = cephfs  # type: ignore[attr-defined]
    try:
        with pytest.raises(grpc.RpcError) as err:
            call(d)  # type: ignore[operator]
        assert err.value.code() == Code.UNAVAILABLE
        assert d.proc.wait(10) == -signal.SIGKILL
    finally:
        if d.proc.poll() is None:  # the fault point was never reached
            d.proc.kill()
            d.proc.wait(10)


def test_kill_during_create_and_during_a_clone(cephfs: Filesystem, fsd: Driver,
                                               tmp_path: Path) -> None:
    _crash(cephfs, tmp_path / "a", "create-volume", lambda d: create(d, "pvc-crash"))
    vol = create(fsd, "pvc-crash")
    assert create(fsd, "pvc-crash") == vol
    assert [s for s in cephfs.subvolumes() if s == subvolume(fsd, vol)] == [subvolume(fsd, vol)]
    _crash(cephfs, tmp_path / "b", "clone-started", lambda d: create(
        d, "pvc-crash-clone", source=Src(volume=Src.VolumeSource(volume_id=vol.volume_id))))
    clone = create_ready(fsd, "pvc-crash-clone", Src(volume=Src.VolumeSource(
        volume_id=vol.volume_id)))
    assert fs_of(fsd).info(subvolume(fsd, clone))["state"] == "complete"
    assert cephfs.snapshots(subvolume(fsd, vol)) == []  # the clone's snapshot is gone
    # Killed after the Ceph snapshot, before its record is complete: never listed, and a
    # DeleteSnapshot (the CO gave up) still removes it.
    _crash(cephfs, tmp_path / "c", "create-snapshot", lambda d: snapshot(
        d, "snap-crash", vol.volume_id))
    assert len(cephfs.snapshots(subvolume(fsd, vol))) == 1
    listed = fsd.controller.ListSnapshots(pb.ListSnapshotsRequest(
        source_volume_id=vol.volume_id, secrets=secrets(cephfs)), timeout=30)
    assert list(listed.entries) == []
    delete_snapshot(fsd, f"fs:{local_id_for_name('snap-crash')}")
    assert cephfs.snapshots(subvolume(fsd, vol)) == []
    delete(fsd, clone.volume_id)
    delete(fsd, vol.volume_id)
    assert not {subvolume(fsd, vol), subvolume(fsd, clone)} & set(cephfs.subvolumes())


def test_dead_client_is_abnormal_and_remounted_at_the_next_publish(fsd: Driver,
                                                                   tmp_path: Path) -> None:
    vol = create(fsd, "pvc-remount")
    s, t = tmp_path / "s", tmp_path / "t"
    try:
        stage(fsd, vol, s)
        publish(fsd, vol, s, t)
        ok(f"echo kept > {t}/f && sync")
        pids = [int(p) for p in ok("pgrep -x ceph-fuse || true").split()
                if str(s).encode() in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(pids) == 1
        os.kill(pids[0], signal.SIGKILL)
        time.sleep(0.5)
        # Its MDS session keeps its caps until evicted (see Filesystem.evict_client_of).
        assert fs_of(fsd).evict_client_of(pids[0]) == 1
        stats = fsd.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
            volume_id=vol.volume_id, volume_path=str(t)), timeout=30)
        assert stats.volume_condition.abnormal
        assert "ceph-fuse" in stats.volume_condition.message
        publish(fsd, vol, s, t)  # kubelet republishes: the stage is mounted again
        assert ok(f"cat {t}/f").strip() == "kept"
        unpublish(fsd, vol, t)
        unstage(fsd, vol, s)
    finally:
        delete(fsd, vol.volume_id)


def test_refusals_leave_nothing_behind(fsd: Driver) -> None:
    """A bad mutable parameter, or a clone over limit_bytes, is refused before anything is
    made: no subvolume, no temporary snapshot on the source."""
    fs = fs_of(fsd)
    before = set(fs.subvolumes())
    for pin in ("-2", "abc", "", "0x1", "\uff11", "99999999999999999999"):
        req = pb.CreateVolumeRequest(name=f"pvc-badpin-{len(pin)}", volume_capabilities=[
            mount_cap()], secrets=secrets(fs), mutable_parameters={"exportPin": pin})
        with pytest.raises(grpc.RpcError) as err:
            fsd.controller.CreateVolume(req, timeout=30)
        assert err.value.code() == Code.INVALID_ARGUMENT, pin
    src = create(fsd, "pvc-limit-src", 64 * MiB)
    try:
        req = pb.CreateVolumeRequest(
            name="pvc-limit-clone", volume_capabilities=[mount_cap()], secrets=secrets(fs),
            capacity_range=pb.CapacityRange(required_bytes=8 * MiB, limit_bytes=16 * MiB))
        req.volume_content_source.volume.volume_id = src.volume_id
        with pytest.raises(grpc.RpcError) as err:
            fsd.controller.CreateVolume(req, timeout=30)
        assert err.value.code() == Code.OUT_OF_RANGE
        assert fs.snapshots(subvolume(fsd, src)) == []
    finally:
        delete(fsd, src.volume_id)
    assert set(fs.subvolumes()) == before


def test_mgr_not_answering_is_unavailable_and_nothing_leaks(fsd: Driver) -> None:
    """librados 16.2 crashes on a late answer to a mgr command it timed out: the driver bounds
    the calls itself, survives the answer, and a create the mgr runs late is still ours to
    delete."""
    fs = fs_of(fsd)
    mgr = fs.cluster._daemons["mgr.x"]
    os.kill(mgr.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            create(fsd, "pvc-mgr-stalled")
        assert err.value.code() == Code.UNAVAILABLE and time.monotonic() - t0 < 15
        assert "mgr" in (err.value.details() or "")
    finally:
        os.kill(mgr.pid, signal.SIGCONT)
    vid = "fs:" + local_id_for_name("pvc-mgr-stalled")
    deadline = time.monotonic() + 60
    while True:  # the queued create runs first, then this delete removes it
        try:
            delete(fsd, vid)
            break
        except grpc.RpcError as exc:
            assert exc.code() == Code.UNAVAILABLE and time.monotonic() < deadline, exc
            time.sleep(1)
    assert subvolume(fsd, vid) not in fs.subvolumes()
    assert fsd.proc.poll() is None, "the driver died of the mgr's late answers"
    assert create(fsd, "pvc-after-mgr").volume_id  # and works again
    delete(fsd, create(fsd, "pvc-after-mgr").volume_id)


def test_kernel_mounter_without_the_module_says_so(cephfs: Filesystem, tmp_path: Path
                                                   ) -> None:
    """What runs here: the kernel mounter's refusal on a node without the ceph module. The
    mount itself needs the module (skipped below)."""
    d = start_driver(tmp_path, write_config(tmp_path / "c.yaml", {
        "fs": backend_config(cephfs, tmp_path, mounter="kernel")}))
    d.fs = cephfs  # type: ignore[attr-defined]
    try:
        vol = create(d, "pvc-kernel")
        with pytest.raises(grpc.RpcError) as err:
            stage(d, vol, tmp_path / "s")
        assert err.value.code() == Code.FAILED_PRECONDITION
        assert "kernel module" in (err.value.details() or "")
        assert list((tmp_path / "node" / "keys").iterdir()) == []  # no key left on disk
        delete(d, vol.volume_id)
    finally:
        assert d.stop() == 0, d.log()


@pytest.mark.skipif(not Path("/sys/module/ceph").exists(),
                    reason="the kernel mounter needs the ceph kernel module, which this machine "
                           "lacks (and cannot load); ceph-fuse covers the node side here")
def test_kernel_mount_shares_data(cephfs: Filesystem, tmp_path: Path) -> None:
    d = start_driver(tmp_path, write_config(tmp_path / "c.yaml", {
        "fs": backend_config(cephfs, tmp_path, mounter="kernel")}))
    d.fs = cephfs  # type: ignore[attr-defined]
    try:
        vol = create(d, "pvc-kernel-data")
        stage(d, vol, tmp_path / "s")
        ok(f"echo k > {tmp_path}/s/f && sync")
        unstage(d, vol, tmp_path / "s")
        delete(d, vol.volume_id)
    finally:
        assert d.stop() == 0, d.log()


def test_record_is_json_in_the_metadata_pool(fsd: Driver) -> None:
    fs = fs_of(fsd)
    vol = create(fsd, "pvc-record", 8 * MiB)
    try:
        local = vol.volume_id.split(":", 1)[1]
        assert f"vol.{local}" in records(fs)
        raw = subprocess.run(
            ["rados", "--conf", str(fs.cluster.conf), "--name", "client.admin",
             "--keyring", str(fs.cluster.admin_keyring), "-p", f"cephfs.{fs.name}.meta",
             "-N", f"berth.{fs.group}", "get", f"vol.{local}", "-"], capture_output=True,
            timeout=60, check=True).stdout
        rec = json.loads(raw)
        assert rec["name"] == "pvc-record" and rec["size"] == 8 * MiB
        assert rec["path"] == vol.volume_context["subvolumePath"]
    finally:
        delete(fsd, vol.volume_id)


# Last: the mgr's volumes module needs a moment once the MDS answers again.
def test_mds_not_answering_is_abnormal_and_unstage_is_bounded(fsd: Driver, tmp_path: Path
                                                              ) -> None:
    fs = fs_of(fsd)
    vol = create(fsd, "pvc-mds")
    s, t = tmp_path / "s", tmp_path / "t"
    stage(fsd, vol, s)
    publish(fsd, vol, s, t)
    ok(f"echo x > {t}/f && sync")
    fs.pause_mds()
    try:
        t0 = time.monotonic()
        stats = fsd.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
            volume_id=vol.volume_id, volume_path=str(t)), timeout=60)
        assert stats.volume_condition.abnormal, stats
        unpublish(fsd, vol, t)
        unstage(fsd, vol, s)
        assert time.monotonic() - t0 < 45
        assert "ceph-fuse" not in ok(f"grep -F ' {s} ' /proc/self/mountinfo || true")
        # Its ceph-fuse cannot flush or close its session: it is ended after a grace
        # (4 x timeoutSeconds), which frees the callers it holds in D state.
        deadline = time.monotonic() + 40
        while [p for p in ok("pgrep -x ceph-fuse || true").split()
               if str(s).encode() in Path(f"/proc/{p}/cmdline").read_bytes()]:
            assert time.monotonic() < deadline, "ceph-fuse was never ended"
            time.sleep(0.5)
    finally:
        fs.resume_mds()
    # The volumes module takes a while to reach the MDS again: UNAVAILABLE until then (as the
    # provisioner would, retry).
    deadline = time.monotonic() + 120
    while True:
        try:
            delete(fsd, vol.volume_id)
            break
        except grpc.RpcError as exc:
            assert exc.code() == Code.UNAVAILABLE and time.monotonic() < deadline, exc
            time.sleep(1)
    assert subvolume(fsd, vol) not in fs.subvolumes()
