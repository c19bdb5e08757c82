"""NFS controller against a real NFS-Ganesha: the driver works through libnfs, the test checks
what landed on the server's own filesystem."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from csi_driver.csi import csi_pb2 as pb

from ..conftest import status_of
from ..harness import Driver, MiB, mount_cap, write_config
from .fixtures import nfs_backend, start_nfs_driver
from .server import SILENT_ADDRESS, NfsServer

Mode = pb.VolumeCapability.AccessMode.Mode
K8S = "csi.storage.k8s.io/"


def create(driver: Driver, name: str, backend: str = "nfs", size: int = 10 * MiB,
           mode: int = Mode.MULTI_NODE_MULTI_WRITER, **params: str) -> pb.Volume:
    return driver.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name, capacity_range=pb.CapacityRange(required_bytes=size),
        volume_capabilities=[mount_cap(mode)], parameters={"backend": backend, **params},
    ), timeout=30).volume


def wait_for(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def snapshot_ready(driver: Driver, name: str, volume_id: str, timeout: float = 60
                   ) -> pb.Snapshot:
    request = pb.CreateSnapshotRequest(name=name, source_volume_id=volume_id)
    deadline = time.monotonic() + timeout
    while True:
        snap = driver.controller.CreateSnapshot(request, timeout=30).snapshot
        if snap.ready_to_use:
            return snap
        assert time.monotonic() < deadline, "snapshot never became ready"
        time.sleep(0.1)


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything a copy must keep, per relative path, as the server's filesystem sees it."""
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, str] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(root))
        kind = stat.S_IFMT(st.st_mode)
        extra: object = None
        if stat.S_ISLNK(st.st_mode):
            extra = os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            # Holes must stay holes; zeros may become holes (as cp --sparse=always).
            holes = path.name == "sparse" and st.st_blocks * 512 < st.st_size
            extra = (path.read_bytes(), holes, st.st_nlink,
                     inodes.setdefault(st.st_ino, rel))
        mtime = None if stat.S_ISLNK(st.st_mode) else st.st_mtime_ns // 1000
        out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, mtime, extra)
    return out


def fill(root: Path) -> None:
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "file").write_bytes(b"data" * 1000)
    os.chown(root / "dir" / "file", 1234, 5678)
    os.chmod(root / "dir" / "file", 0o640)
    os.link(root / "dir" / "file", root / "hardlink")
    os.symlink("dir/file", root / "symlink")
    os.lchown(root / "symlink", 42, 43)
    with open(root / "sparse", "wb") as f:
        f.truncate(64 * MiB)
        f.seek(32 * MiB)
        f.write(b"middle")
    # Written in full, ending in zeros: the copy must keep its length, not just its data.
    (root / "zero-tail").write_bytes(b"x" + bytes(300_000))
    # Set-id bits survive the chown (which may clear them) because chmod comes after it.
    (root / "setuid").write_bytes(os.urandom(1 << 20))  # the pipelines' size limit exactly
    os.chown(root / "setuid", 1234, 5678)
    os.chmod(root / "setuid", 0o6755)
    (root / "empty").touch()
    os.utime(root / "empty", ns=(1_000_000_000_000_000_000, 1_500_000_000_000_000_000))
    for i in range(40):  # more small files than one pipeline keeps in flight
        (root / "dir" / "sub" / f"small-{i}").write_bytes(os.urandom(i * 997))
    os.chmod(root / "dir", 0o2750)
    os.utime(root / "dir", ns=(1_000_000_000_000_000_000, 1_000_000_000_123_456_789))


def test_create_delete_lifecycle(nfs_driver: Driver, nfs_server: NfsServer, name: str) -> None:
    vol = create(nfs_driver, name)
    assert vol.volume_id.startswith("nfs:")
    place = nfs_server.export_dir / name  # default subDir: the PV name
    assert place.is_dir()
    assert stat.S_IMODE(place.stat().st_mode) == 0o777
    assert vol.volume_context["subDir"] == name
    assert vol.volume_context["server"] == nfs_server.address
    assert vol.volume_context["share"] == "/export"
    assert create(nfs_driver, name).volume_id == vol.volume_id  # retried: same volume
    (place / "payload").write_text("x")

    got = nfs_driver.controller.ControllerGetVolume(
        pb.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert got.volume.capacity_bytes == 10 * MiB
    assert not got.status.volume_condition.abnormal
    listed = {e.volume.volume_id for e in nfs_driver.controller.ListVolumes(
        pb.ListVolumesRequest()).entries}
    assert vol.volume_id in listed

    nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert not place.exists()
    nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert status_of(lambda: nfs_driver.controller.ControllerGetVolume(
        pb.ControllerGetVolumeRequest(volume_id=vol.volume_id))) == grpc.StatusCode.NOT_FOUND
    wait_for(lambda: not any((nfs_server.export_dir / ".berth" / "trash").iterdir()))


def test_subdir_template_retain_and_archive(nfs_driver: Driver, nfs_server: NfsServer,
                                            name: str) -> None:
    meta = {K8S + "pvc/name": "data-db-0", K8S + "pvc/namespace": f"ns-{name}"[:60],
            K8S + "pv/name": name}
    vol = create(nfs_driver, name, backend="tree", **meta)
    place = nfs_server.export_dir / meta[K8S + "pvc/namespace"] / "data-db-0"
    assert place.is_dir() and vol.volume_context["subDir"] == str(
        place.relative_to(nfs_server.export_dir))
    # Another volume that renders to the same directory is refused, not merged.
    assert status_of(lambda: create(nfs_driver, name + "-other", backend="tree", **meta)
                     ) == grpc.StatusCode.ALREADY_EXISTS
    (place / "keep").write_text("kept")
    nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    archived = [p for p in place.parent.iterdir() if p.name.startswith("archived-data-db-0-")]
    assert not place.exists() and len(archived) == 1
    assert (archived[0] / "keep").read_text() == "kept"

    # retain: the data stays, and a new volume with the same subDir adopts it.
    vol = create(nfs_driver, name, backend="tree", onDelete="retain", **meta)
    (place / "keep").write_text("again")
    nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert (place / "keep").read_text() == "again"
    vol = create(nfs_driver, name + "-new", backend="tree", onDelete="retain", **meta)
    assert (place / "keep").read_text() == "again"
    nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))


def test_retried_delete_spares_the_next_volume_of_the_same_subdir(
        nfs_driver: Driver, nfs_server: NfsServer, name: str) -> None:
    """A PVC deleted and created again renders the same subDir; the provisioner retrying the
    first DeleteVolume (its answer lost) must not delete the new volume's data."""
    meta = {K8S + "pvc/name": "again", K8S + "pvc/namespace": f"ns-{name}"[:60]}
    old = create(nfs_driver, name, backend="tree", onDelete="delete", **meta)
    nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=old.volume_id))
    new = create(nfs_driver, name + "-2", backend="tree", onDelete="delete", **meta)
    assert new.volume_id != old.volume_id
    place = nfs_server.export_dir / meta[K8S + "pvc/namespace"] / "again"
    (place / "new-data").write_text("keep me")
    nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=old.volume_id))
    assert (place / "new-data").read_text() == "keep me"
    nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=new.volume_id))
    assert not place.exists()


def test_volumes_never_nest(nfs_driver: Driver, nfs_server: NfsServer, name: str) -> None:
    """A volume whose subDir is above or below another's would expose (and, on delete, trash)
    the other's data: both orders are ALREADY_EXISTS."""
    ns = f"nest-{name}"[:60]
    inner = create(nfs_driver, name + "-inner", backend="tree",
                   **{K8S + "pvc/name": "db", K8S + "pvc/namespace": ns})
    assert status_of(lambda: create(nfs_driver, name + "-outer", subDir=ns)
                     ) == grpc.StatusCode.ALREADY_EXISTS
    nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=inner.volume_id))
    outer = create(nfs_driver, name + "-outer", subDir=ns)  # free again
    assert status_of(lambda: create(
        nfs_driver, name + "-inner", backend="tree",
        **{K8S + "pvc/name": "db", K8S + "pvc/namespace": ns})) == grpc.StatusCode.ALREADY_EXISTS
    nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=outer.volume_id))


def test_abandoned_create_releases_its_subdir(nfs_driver: Driver, nfs_server: NfsServer,
                                              name: str) -> None:
    """A create that never finished (its PVC deleted while it failed) holds its subDir only
    while the provisioner could still retry it."""
    blocked = create(nfs_driver, name)
    berth = nfs_server.export_dir / ".berth"
    local = blocked.volume_id.split(":", 1)[1]
    # Make the volume look like a create in progress: a claim, no record yet.
    record = berth / "volumes" / f"{local}.json"
    record.rename(berth / "saved.json")
    assert status_of(lambda: create(nfs_driver, name + "-2", subDir=name)
                     ) == grpc.StatusCode.ALREADY_EXISTS
    claim = next(p for p in (berth / "claims").glob("*.json") if name + '"' in p.read_text())
    hours_ago = time.time() - 2 * 3600
    os.utime(claim, (hours_ago, hours_ago))
    taken = create(nfs_driver, name + "-2", subDir=name)
    assert name + "-2" in claim.read_text()
    nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=taken.volume_id))
    (berth / "saved.json").unlink()


def test_directory_mode_and_owner(nfs_driver: Driver, nfs_server: NfsServer, name: str) -> None:
    vol = create(nfs_driver, name, mountPermissions="0750", uid="1001", gid="2002")
    st = (nfs_server.export_dir / name).stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 1001, 2002)
    nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))


@pytest.mark.parametrize("params", [
    {"subDir": "../escape"},
    {"subDir": "a/../../escape"},
    {"subDir": "/absolute"},
    {"subDir": ".berth/volumes"},
    {"subDir": "${pvc.metadata.name}"},  # no --extra-create-metadata
    {"subDir": "${pvc.metadata.name}", K8S + "pvc/name": ".."},
    {"subDir": "${nope}"},
    {"onDelete": "shred"},
    {"mountPermissions": "rwx"},
    {"uid": "root"},
    {"nfsVersion": "5"},
])
def test_bad_parameters(nfs_driver: Driver, nfs_server: NfsServer, name: str,
                        params: dict[str, str]) -> None:
    before = sorted(p.name for p in nfs_server.export_dir.iterdir())
    with pytest.raises(grpc.RpcError) as err:
        create(nfs_driver, name, **params)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert sorted(p.name for p in nfs_server.export_dir.iterdir()) == before


def test_modify_mount_settings(nfs_driver: Driver, nfs_server: NfsServer, name: str) -> None:
    vol = create(nfs_driver, name, nfsVersion="4.1")
    record = nfs_server.export_dir / ".berth" / "volumes" / f"{vol.volume_id.split(':')[1]}.json"

    def modify(volume_id: str = vol.volume_id, **params: str) -> object:
        return nfs_driver.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
            volume_id=volume_id, mutable_parameters=params), timeout=30)

    before = record.read_bytes()
    for bad in ({"nfsVersion": "5"}, {"onDelete": "retain"}, {"mountOptions": "vers=3"},
                {"mountOptions": "hard,addr=10.0.0.1"}, {"mountOptions": "a b"},
                {"nfsVersion": "4.2", "mountOptions": "x;y"}):
        assert status_of(lambda bad=bad: modify(**bad)) == grpc.StatusCode.INVALID_ARGUMENT, bad
    assert record.read_bytes() == before  # nothing of a refused change was kept
    assert status_of(lambda: modify("nfs:nosuchvolume", nfsVersion="4.2")) == \
        grpc.StatusCode.NOT_FOUND
    modify(nfsVersion="4.2", mountOptions="noac,timeo=50")
    modify(nfsVersion="4.0")  # a later change keeps what it does not name
    assert json.loads(record.read_text())["mutable"] == {
        "nfsVersion": "4.0", "mountOptions": "noac,timeo=50"}
    # A VolumeAttributesClass at create: its values are the context's from the start.
    made = nfs_driver.controller.CreateVolume(pb.CreateVolumeRequest(
        name=f"{name}-vac", capacity_range=pb.CapacityRange(required_bytes=MiB),
        volume_capabilities=[mount_cap(Mode.MULTI_NODE_MULTI_WRITER)],
        parameters={"backend": "nfs"}, mutable_parameters={"nfsVersion": "4.2"}),
        timeout=30).volume
    assert made.volume_context["nfsVersion"] == "4.2"
    assert status_of(lambda: nfs_driver.controller.CreateVolume(pb.CreateVolumeRequest(
        name=f"{name}-bad", volume_capabilities=[mount_cap(Mode.MULTI_NODE_MULTI_WRITER)],
        parameters={"backend": "nfs"}, mutable_parameters={"nfsVersion": "2"}), timeout=30)
        ) == grpc.StatusCode.INVALID_ARGUMENT
    for volume_id in (vol.volume_id, made.volume_id):
        nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))


def test_capacity_and_expansion(nfs_driver: Driver, nfs_server: NfsServer, name: str) -> None:
    cap = nfs_driver.controller.GetCapacity(pb.GetCapacityRequest(
        parameters={"backend": "nfs"})).available_capacity
    st = os.statvfs(nfs_server.export_dir)
    assert abs(cap - st.f_bavail * st.f_frsize) < 0.05 * cap
    vol = create(nfs_driver, name)
    grown = nfs_driver.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=50 * MiB)))
    assert grown.capacity_bytes == 50 * MiB and not grown.node_expansion_required
    got = nfs_driver.controller.ControllerGetVolume(
        pb.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert got.volume.capacity_bytes == 50 * MiB
    nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))


def test_all_access_modes_accepted(nfs_driver: Driver, name: str) -> None:
    for mode in (Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY,
                 Mode.MULTI_NODE_READER_ONLY, Mode.MULTI_NODE_SINGLE_WRITER,
                 Mode.MULTI_NODE_MULTI_WRITER, Mode.SINGLE_NODE_SINGLE_WRITER,
                 Mode.SINGLE_NODE_MULTI_WRITER):
        vol = create(nfs_driver, f"{name}-{mode}", mode=mode)
        nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))


def test_snapshot_restore_and_clone_keep_everything(nfs_driver: Driver, nfs_server: NfsServer,
                                                    name: str) -> None:
    vol = create(nfs_driver, name)
    source = nfs_server.export_dir / name
    fill(source)
    expected = tree(source)
    assert expected["sparse"][5][1] is True  # type: ignore[index] - the source is sparse

    snap = snapshot_ready(nfs_driver, name + "-snap", vol.volume_id)
    assert snap.source_volume_id == vol.volume_id and snap.size_bytes == 10 * MiB
    (source / "dir" / "file").write_text("changed after the snapshot")

    restored = create_from_snapshot(nfs_driver, name + "-restored", snap.snapshot_id)
    assert tree(nfs_server.export_dir / (name + "-restored")) == expected

    clone = nfs_driver.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name + "-clone", volume_capabilities=[mount_cap()],
        capacity_range=pb.CapacityRange(required_bytes=10 * MiB), parameters={"backend": "nfs"},
        volume_content_source=pb.VolumeContentSource(
            volume=pb.VolumeContentSource.VolumeSource(volume_id=vol.volume_id)),
    ), timeout=30).volume
    assert tree(nfs_server.export_dir / (name + "-clone")) == tree(source)

    listed = nfs_driver.controller.ListSnapshots(pb.ListSnapshotsRequest(
        snapshot_id=snap.snapshot_id)).entries
    assert [e.snapshot.ready_to_use for e in listed] == [True]
    for v in (vol, restored, clone):
        nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id))
    nfs_driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert status_of(lambda: nfs_driver.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name + "-late", volume_capabilities=[mount_cap()], parameters={"backend": "nfs"},
        volume_content_source=pb.VolumeContentSource(
            snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)),
    ))) == grpc.StatusCode.NOT_FOUND


def test_large_snapshot_reports_progress(nfs_driver: Driver, nfs_server: NfsServer,
                                         name: str) -> None:
    """A copy longer than the RPC's wait answers ready_to_use=false, then true; a restore
    asked for meanwhile is ABORTED (retryable), never half made."""
    vol = create(nfs_driver, name)
    with open(nfs_server.export_dir / name / "big", "wb") as f:
        for _ in range(768):
            f.write(os.urandom(MiB))
    request = pb.CreateSnapshotRequest(name=name + "-snap", source_volume_id=vol.volume_id)
    first = nfs_driver.controller.CreateSnapshot(request, timeout=30).snapshot
    assert not first.ready_to_use
    restore = pb.CreateVolumeRequest(
        name=name + "-restored", volume_capabilities=[mount_cap()],
        parameters={"backend": "nfs"}, volume_content_source=pb.VolumeContentSource(
            snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=first.snapshot_id)))
    assert status_of(lambda: nfs_driver.controller.CreateVolume(restore)
                     ) == grpc.StatusCode.ABORTED
    assert not (nfs_server.export_dir / (name + "-restored")).exists()
    snap = snapshot_ready(nfs_driver, name + "-snap", vol.volume_id, timeout=120)
    assert snap.snapshot_id == first.snapshot_id
    assert snap.creation_time == first.creation_time
    nfs_driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))


def test_sparse_image_copies_only_its_data_quickly(nfs_driver: Driver, nfs_server: NfsServer,
                                                   name: str) -> None:
    """A 10 GiB sparse file holding 64 MiB: copied in ranges by every worker (data straddles
    range boundaries), holes stay holes, and the snapshot is ready far sooner than the ~42 s
    one connection reading all of it took."""
    vol = create(nfs_driver, name)
    src = nfs_server.export_dir / name / "disk.img"
    with open(src, "wb") as f:
        f.truncate(10 << 30)
        for i in range(63):  # 1 MiB every 160 MiB, some across a 256 MiB boundary
            f.seek(i * (160 << 20) + (256 << 20) - (512 << 10))
            f.write(os.urandom(MiB))
        f.seek((10 << 30) - MiB)
        f.write(os.urandom(MiB))  # the last MiB: the end of the last range
    started = time.monotonic()
    snap = snapshot_ready(nfs_driver, name + "-snap", vol.volume_id, timeout=120)
    took = time.monotonic() - started
    print(f"\nsnapshot of a 10 GiB sparse image holding 64 MiB: {took:.1f} s")
    copy = nfs_server.export_dir / ".berth" / "snapshots" / snap.snapshot_id.split(":", 1)[1]
    assert subprocess.run(["cmp", str(src), str(copy / "disk.img")]).returncode == 0
    st = (copy / "disk.img").stat()
    assert st.st_size == 10 << 30 and st.st_blocks * 512 <= 80 * MiB, st
    assert took < 25, took
    # A restore reads only the ranges the snapshot's copy wrote (its data map), not the holes:
    # well inside one CreateVolume call, where reading all 10 GiB again took ~9 s.
    started = time.monotonic()
    restored = create_from_snapshot(nfs_driver, name + "-restored", snap.snapshot_id)
    restore_s = time.monotonic() - started
    print(f"restore of it: {restore_s:.1f} s")
    image = nfs_server.export_dir / (name + "-restored") / "disk.img"
    assert subprocess.run(["cmp", str(src), str(image)]).returncode == 0
    assert image.stat().st_blocks * 512 <= 80 * MiB
    assert restore_s < 4, restore_s
    nfs_driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert not (copy.parent / (copy.name + ".extents")).exists()
    for v in (vol, restored):
        nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id))


def test_delete_of_many_files_is_one_rename(nfs_driver: Driver, nfs_server: NfsServer,
                                            name: str) -> None:
    vol = create(nfs_driver, name)
    neighbour = create(nfs_driver, name + "-neighbour")
    (nfs_server.export_dir / (name + "-neighbour") / "precious").write_text("x")
    place = nfs_server.export_dir / name
    # Links out of the volume: the purge must remove them, never what they point at.
    os.symlink(f"../{name}-neighbour", place / "dir-link")
    os.symlink("/", place / "root-link")
    for i in range(20):
        d = place / f"d{i}"
        d.mkdir()
        for j in range(500):
            (d / f"f{j}").touch()
    trash = nfs_server.export_dir / ".berth" / "trash"
    nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id),
                                       timeout=5)
    assert not place.exists()  # gone from sight at once; the 10,000 files go in the background
    wait_for(lambda: not any(trash.iterdir()), timeout=120)
    assert (nfs_server.export_dir / (name + "-neighbour") / "precious").read_text() == "x"
    nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=neighbour.volume_id))


def test_kill_during_snapshot_copy_then_retry(nfs_server: NfsServer, tmp_path: Path,
                                              name: str) -> None:
    """SIGKILL in the middle of a copy: the retry (after a restart) copies again and the
    snapshot is never 'ready' with half the data."""
    (tmp_path / "a").mkdir()
    first = start_nfs_driver(nfs_server, tmp_path / "a", env={"BERTH_FAULTS": "nfs-copy"})
    vol = create(first, name)
    payload = os.urandom(8 * MiB)
    (nfs_server.export_dir / name / "data").write_bytes(payload)
    request = pb.CreateSnapshotRequest(name=name + "-snap", source_volume_id=vol.volume_id)
    with pytest.raises(grpc.RpcError):
        first.controller.CreateSnapshot(request, timeout=30)  # the driver dies copying
    assert first.proc.wait(10) == -9
    half = list((nfs_server.export_dir / ".berth" / "tmp").glob("snap-*"))
    assert half, "the kill should have left a partial copy behind"

    (tmp_path / "b").mkdir()
    second = start_nfs_driver(nfs_server, tmp_path / "b")
    try:
        snap = snapshot_ready(second, name + "-snap", vol.volume_id)
        local = snap.snapshot_id.split(":", 1)[1]
        copy = nfs_server.export_dir / ".berth" / "snapshots" / local / "data"
        assert copy.read_bytes() == payload
        assert not any(p.name.startswith("snap-") for p in
                       (nfs_server.export_dir / ".berth" / "tmp").iterdir())
        second.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
        second.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    finally:
        second.stop()


# A retried restore answers ABORTED after copyWaitSeconds (1 s) and is retried 0.3 s later: the
# age leaves room for a loaded machine's slower answers (2 s did not: 3 s gaps were seen in CI).
AGE, FILES = 4, 20000


def test_abandoned_restore_is_reclaimed(nfs_server: NfsServer, tmp_path: Path,
                                        name: str) -> None:
    """A restore that answers ABORTED and is never retried (its PVC deleted) leaves nothing
    once its claim is older than abandonAfterSeconds; one retried all along is never touched,
    even when its copy outlasts that age."""
    driver = start_nfs_driver(nfs_server, tmp_path, {"nfs": nfs_backend(
        nfs_server, copyWaitSeconds=1, abandonAfterSeconds=AGE)})
    berth = nfs_server.export_dir / ".berth"
    try:
        vol = create(driver, name)
        for i in range(FILES):  # ~8 s to copy at ~2500 files/s: longer than the age
            (nfs_server.export_dir / name / f"f{i}").write_bytes(b"%d" % i)
        snap = snapshot_ready(driver, name + "-snap", vol.volume_id, timeout=120)
        copy = berth / "snapshots" / snap.snapshot_id.split(":", 1)[1]
        before = tree(copy)

        def restore(new: str) -> pb.Volume:
            return driver.controller.CreateVolume(pb.CreateVolumeRequest(
                name=new, volume_capabilities=[mount_cap()], parameters={"backend": "nfs"},
                volume_content_source=pb.VolumeContentSource(
                    snapshot=pb.VolumeContentSource.SnapshotSource(
                        snapshot_id=snap.snapshot_id))), timeout=30).volume

        def until_made(new: str) -> pb.Volume:
            deadline = time.monotonic() + 120
            while True:
                try:
                    return restore(new)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.ABORTED, exc.details()
                    assert time.monotonic() < deadline
                    time.sleep(0.3)

        started = time.monotonic()
        live = until_made(name + "-live")
        print(f"\nrestore of {FILES} files, retried: {time.monotonic() - started:.1f} s")
        assert len(list((nfs_server.export_dir / (name + "-live")).iterdir())) == FILES

        gone = name + "-gone"
        assert status_of(lambda: restore(gone)) == grpc.StatusCode.ABORTED

        def leftovers() -> list[str]:
            found = [str(p) for p in (berth / "volumes").glob("*.copying")
                     if f'"{gone}"' in p.read_text()]
            found += [str(p) for p in (berth / "claims").glob("*.json")
                      if f'"{gone}"' in p.read_text()]
            found += [str(p) for p in (berth / "tmp").glob("vol-*")]
            found += [str(p) for p in nfs_server.export_dir.glob(gone)]
            return found

        assert leftovers(), "the restore should be under way"
        wait_for(lambda: not leftovers(), timeout=60)
        assert "reclaiming the copy of volume " + repr(gone) in driver.log()
        assert tree(copy) == before  # the source is intact
        assert len(list((nfs_server.export_dir / name).iterdir())) == FILES
        # A late retry starts over from nothing and still gets the whole copy.
        late = until_made(gone)
        assert len(list((nfs_server.export_dir / gone).iterdir())) == FILES
        for volume_id in (live.volume_id, late.volume_id, vol.volume_id):
            driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))
        driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
        assert "reclaiming the copy of volume " + repr(name + "-live") not in driver.log()
    finally:
        assert driver.stop() == 0, driver.log()


def test_kill_before_record_then_retry(nfs_server: NfsServer, tmp_path: Path,
                                       name: str) -> None:
    (tmp_path / "a").mkdir()
    first = start_nfs_driver(nfs_server, tmp_path / "a",
                             env={"BERTH_FAULTS": "nfs-create-volume"})
    with pytest.raises(grpc.RpcError):
        create(first, name)
    assert first.proc.wait(10) == -9
    (tmp_path / "b").mkdir()
    second = start_nfs_driver(nfs_server, tmp_path / "b")
    try:
        vol = create(second, name)
        assert (nfs_server.export_dir / name).is_dir()
        second.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
        assert not (nfs_server.export_dir / name).exists()
    finally:
        second.stop()


def test_export_errors(nfs_server: NfsServer, tmp_path: Path, name: str) -> None:
    driver = start_nfs_driver(nfs_server, tmp_path, {
        "silent": nfs_backend(nfs_server, server=SILENT_ADDRESS, timeoutSeconds=3),
        "squashed": nfs_backend(nfs_server, share="/denied"),
        "nowhere": nfs_backend(nfs_server, share="/no-such-export"),
        "unknown": nfs_backend(nfs_server, server="nfs.invalid"),
    })
    # The code, and the server's own answer in the message.
    cases = {
        "silent": (grpc.StatusCode.UNAVAILABLE, SILENT_ADDRESS),  # nobody answers
        "squashed": (grpc.StatusCode.PERMISSION_DENIED, "NFS3ERR_ACCES"),  # squashed to nobody
        "nowhere": (grpc.StatusCode.NOT_FOUND, "NFS4ERR_NOENT"),  # no such export
        "unknown": (grpc.StatusCode.INVALID_ARGUMENT, "nfs.invalid"),  # does not resolve
    }
    try:
        for backend, (code, words) in cases.items():
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                create(driver, name, backend=backend)
            assert time.monotonic() - started < 15, backend  # bounded, whatever the failure
            assert err.value.code() == code, (backend, err.value.details())
            assert words in err.value.details() and "Traceback" not in err.value.details()
    finally:
        driver.stop()


def test_server_down_is_unavailable_in_bounded_time(nfs_server: NfsServer, tmp_path: Path,
                                                    name: str) -> None:
    driver = start_nfs_driver(nfs_server, tmp_path)
    try:
        vol = create(driver, name)
        nfs_server.stop_ganesha()
        try:
            started = time.monotonic()
            assert status_of(lambda: create(driver, name + "-2")) == grpc.StatusCode.UNAVAILABLE
            assert not driver.identity.Probe(pb.ProbeRequest(), timeout=30).ready.value
            assert time.monotonic() - started < 15  # timeoutSeconds is 5
        finally:
            nfs_server.start()
        driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    finally:
        driver.stop()


def test_config_rejects_bad_share(tmp_path: Path, nfs_server: NfsServer) -> None:
    config = write_config(tmp_path / "c.yaml", {"x": nfs_backend(nfs_server, share="export")})
    done = subprocess.run([sys.executable, "-m", "csi_driver", "--config", str(config),
                           "--endpoint", f"unix://{tmp_path}/s.sock"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "backends.x.share" in done.stderr


def test_unwritten_10gib_image_snapshots_and_restores_in_one_call(
        nfs_driver: Driver, nfs_server: NfsServer, name: str) -> None:
    """csi-sanity's flow on an image volume (10 GiB, never staged): its snapshot is ready in
    the first CreateSnapshot answer and the restore completes in one CreateVolume call. Both
    read the 10 GiB of holes before (~4-9 s each), so the restore answered ABORTED."""
    vol = create(nfs_driver, name, size=10 << 30, mode=Mode.SINGLE_NODE_WRITER,
                 volumeLayout="image")
    started = time.monotonic()
    snap = nfs_driver.controller.CreateSnapshot(pb.CreateSnapshotRequest(
        name=name + "-snap", source_volume_id=vol.volume_id), timeout=30).snapshot
    assert snap.ready_to_use, f"not ready after {time.monotonic() - started:.1f} s"
    restored = create_from_snapshot(nfs_driver, name + "-restored", snap.snapshot_id,
                                    size=10 << 30, volumeLayout="image")
    took = time.monotonic() - started
    image = nfs_server.export_dir / (name + "-restored") / "disk.img"
    assert image.stat().st_size == 10 << 30 and image.stat().st_blocks == 0
    assert took < 3, took
    nfs_driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    for v in (vol, restored):
        nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id))


def test_image_layout_controller(nfs_driver: Driver, nfs_server: NfsServer, name: str) -> None:
    """volumeLayout image: a sparse image of the requested size, single-node only, grown by
    expansion with the node asked to finish; directories refuse block access."""
    vol = create(nfs_driver, name, mode=Mode.SINGLE_NODE_WRITER, volumeLayout="image")
    image = nfs_server.export_dir / name / "disk.img"
    st = image.stat()
    assert st.st_size == 10 * MiB and st.st_blocks * 512 < MiB  # sparse
    assert vol.volume_context["volumeLayout"] == "image"
    grown = nfs_driver.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=30 * MiB)))
    assert grown.node_expansion_required and image.stat().st_size == 30 * MiB

    for mode in (Mode.MULTI_NODE_MULTI_WRITER, Mode.MULTI_NODE_READER_ONLY):
        assert status_of(lambda m=mode: create(nfs_driver, name + "-rwx", mode=m,
                                               volumeLayout="image")
                         ) == grpc.StatusCode.INVALID_ARGUMENT
    block = pb.CreateVolumeRequest(
        name=name + "-block", volume_capabilities=[pb.VolumeCapability(
            block=pb.VolumeCapability.BlockVolume(),
            access_mode=pb.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_WRITER))],
        capacity_range=pb.CapacityRange(required_bytes=10 * MiB), parameters={"backend": "nfs"})
    assert status_of(lambda: nfs_driver.controller.CreateVolume(block)
                     ) == grpc.StatusCode.INVALID_ARGUMENT
    assert not (nfs_server.export_dir / (name + "-block")).exists()
    # A directory volume cannot be made from an image volume (nor the other way).
    assert status_of(lambda: nfs_driver.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name + "-dir", volume_capabilities=[mount_cap()], parameters={"backend": "nfs"},
        volume_content_source=pb.VolumeContentSource(
            volume=pb.VolumeContentSource.VolumeSource(volume_id=vol.volume_id))))
    ) == grpc.StatusCode.INVALID_ARGUMENT
    # Nor an image from a directory volume's snapshot (mkfs would hide the restored files).
    plain = create(nfs_driver, name + "-plain")
    snap = snapshot_ready(nfs_driver, name + "-plain-snap", plain.volume_id)
    assert status_of(lambda: create_from_snapshot(
        nfs_driver, name + "-as-image", snap.snapshot_id, volumeLayout="image")
    ) == grpc.StatusCode.INVALID_ARGUMENT
    nfs_driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    for v in (vol, plain):
        nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id))
    assert not image.exists()


def test_copies_are_at_least_their_source(nfs_driver: Driver, nfs_server: NfsServer,
                                          name: str) -> None:
    """A restore asked for less than its snapshot holds: as large as the snapshot, or
    OUT_OF_RANGE when limit_bytes forbids that; capabilities checked against the layout."""
    vol = create(nfs_driver, name, size=20 * MiB, mode=Mode.SINGLE_NODE_WRITER,
                 volumeLayout="image")
    snap = snapshot_ready(nfs_driver, name + "-snap", vol.volume_id)
    assert status_of(lambda: create_from_snapshot(
        nfs_driver, name + "-small", snap.snapshot_id, size=10 * MiB, limit=10 * MiB,
        volumeLayout="image")) == grpc.StatusCode.OUT_OF_RANGE
    grown = create_from_snapshot(nfs_driver, name + "-grown", snap.snapshot_id, size=10 * MiB,
                                 volumeLayout="image")
    assert grown.capacity_bytes == 20 * MiB
    assert (nfs_server.export_dir / (name + "-grown") / "disk.img").stat().st_size == 20 * MiB
    rwx = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(),
                              access_mode=pb.VolumeCapability.AccessMode(
                                  mode=Mode.MULTI_NODE_MULTI_WRITER))
    checked = nfs_driver.controller.ValidateVolumeCapabilities(
        pb.ValidateVolumeCapabilitiesRequest(volume_id=vol.volume_id, volume_capabilities=[rwx]))
    assert not checked.HasField("confirmed") and "one node" in checked.message
    assert nfs_driver.controller.GetCapacity(pb.GetCapacityRequest(
        volume_capabilities=[rwx], parameters={"backend": "nfs", "volumeLayout": "image"})
    ).available_capacity == 0
    nfs_driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    for v in (vol, grown):
        nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id))


def create_from_snapshot(driver: Driver, name: str, snapshot_id: str, size: int = 10 * MiB,
                         limit: int = 0, **params: str) -> pb.Volume:
    return driver.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name, volume_capabilities=[mount_cap(Mode.SINGLE_NODE_WRITER)],
        capacity_range=pb.CapacityRange(required_bytes=size, limit_bytes=limit),
        parameters={"backend": "nfs", **params},
        volume_content_source=pb.VolumeContentSource(
            snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id))),
        timeout=30).volume


def _copy_racing(nfs_server: NfsServer, src: str, dst: str, meddle: str,
                 *args: str) -> subprocess.CompletedProcess[str]:
    """copy_tree(src, dst) in the server's namespace, with the Python lines `meddle` (its
    `args` in `args`) run between the walk and the file copies, as a pod racing the copy would.
    A copy libnfs refuses prints "refused <errno>"."""
    probe = (
        "import os, sys\n"
        "from csi_driver.backends.nfs import tree\n"
        "from csi_driver.backends.nfs.libnfs import Connection, NfsError\n"
        "addr, src, dst, *args = sys.argv[1:]\n"
        "walked = tree._parallel\n"
        "def meddled(*a, **k):\n"
        + textwrap.indent(meddle, "    ") +
        "    return walked(*a, **k)\n"
        "tree._parallel = meddled\n"
        "def connect(d):\n"
        "    return Connection(addr, '/export' + ('' if d == '/' else d), 3, 10)\n"
        "try:\n"
        "    tree.copy_tree(connect, src, dst)\n"
        "except NfsError as exc:\n"
        "    print('refused', exc.errno)\n")
    return subprocess.run(nfs_server.in_netns(
        [sys.executable, "-c", probe, nfs_server.address, src, dst, *args]),
        capture_output=True, text=True, timeout=60)


def test_copy_reads_cannot_leave_the_source_volume(nfs_server: NfsServer, name: str) -> None:
    """A copy reads each file through a connection mounted at the source volume: a directory a
    pod swaps for a symlink after the walk listed it (relative, absolute, or climbing with ..)
    cannot lead the read into another volume, because libnfs resolves paths within its mount."""
    export = nfs_server.export_dir
    (export / f"{name}-other").mkdir()
    (export / f"{name}-other" / "secret").write_text("another tenant's")
    for i, target in enumerate((f"../{name}-other", f"/export/{name}-other", f"/{name}-other",
                                f"../../../{name}-other")):
        source = export / f"{name}-{i}"
        (source / "real").mkdir(parents=True)
        (source / "real" / "secret").write_text("mine")
        # The swap happens between the walk and the file copies, as a racing pod's would.
        done = _copy_racing(nfs_server, f"/{name}-{i}", f"/{name}-{i}-copy",
                            "where, target = args\n"
                            "os.rename(f'{where}/real', f'{where}/moved')\n"
                            "os.symlink(target, f'{where}/real')\n",
                            str(source), target)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("refused"), (target, done.stdout)
        copied = [p.read_text() for p in (export / f"{name}-{i}-copy").rglob("*")
                  if p.is_file() and not p.is_symlink()]
        assert "another tenant's" not in copied, target


def test_server_stalls_during_small_file_copy(nfs_server: NfsServer, tmp_path: Path,
                                              name: str) -> None:
    """Ganesha stops answering in the middle of a snapshot of many small files (copied many at
    a time with async calls): the copy gives up within the backend's timeout as UNAVAILABLE,
    and once the server is back a retried CreateSnapshot makes a complete snapshot."""
    driver = start_nfs_driver(nfs_server, tmp_path, {"nfs": nfs_backend(
        nfs_server, timeoutSeconds=2, copyWaitSeconds=1)})
    try:
        vol = create(driver, name)
        source = nfs_server.export_dir / name
        for d in range(40):  # 6,000 files: a few seconds of copying
            (source / f"d{d}").mkdir()
            for f in range(150):
                (source / f"d{d}" / f"f{f}").write_bytes(os.urandom(2048))
        expected = tree(source)
        request = pb.CreateSnapshotRequest(name=name + "-snap", source_volume_id=vol.volume_id)
        assert not driver.controller.CreateSnapshot(request, timeout=10).snapshot.ready_to_use
        assert nfs_server.ganesha is not None
        os.kill(nfs_server.ganesha.pid, signal.SIGSTOP)
        try:
            time.sleep(5)  # the copy's calls time out after 2 s
        finally:
            os.kill(nfs_server.ganesha.pid, signal.SIGCONT)
        codes = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                snap = driver.controller.CreateSnapshot(request, timeout=10).snapshot
            except grpc.RpcError as exc:
                codes.append(exc.code())
                continue
            if snap.ready_to_use:
                break
            time.sleep(0.2)
        assert snap.ready_to_use
        assert grpc.StatusCode.UNAVAILABLE in codes, codes  # the stalled copy was reported
        copy = nfs_server.export_dir / ".berth" / "snapshots" / snap.snapshot_id.split(":", 1)[1]
        assert tree(copy) == expected
    finally:
        driver.stop()


def test_failed_image_stage_leaves_no_mountpoint(nfs_server: NfsServer, tmp_path: Path,
                                                 name: str) -> None:
    """The host has no NFS client, so an image volume's NodeStage fails at mounting the share:
    the mountpoint it made under nodeStateDir must not stay behind (found by csi-sanity)."""
    state = tmp_path / "state"
    driver = start_nfs_driver(nfs_server, tmp_path, {"nfs": nfs_backend(
        nfs_server, nodeStateDir=str(state))})
    try:
        vol = create(driver, name, mode=Mode.SINGLE_NODE_WRITER, volumeLayout="image")
        staging = tmp_path / "staging"
        staging.mkdir()
        code = status_of(lambda: driver.node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging),
            volume_capability=mount_cap(Mode.SINGLE_NODE_WRITER),
            volume_context=vol.volume_context), timeout=30))
        assert code != grpc.StatusCode.OK
        leftovers = [p for p in state.rglob("*") if p.is_dir() and not any(p.iterdir())
                     and p.parent != state]
        assert leftovers == [], leftovers
    finally:
        driver.stop()


def test_image_attach_rules(nfs_driver: Driver, nfs_server: NfsServer, name: str) -> None:
    """ControllerPublish/Unpublish of an NFS image volume, as the spec and csi-sanity ask:
    nodes must have registered (NodeGetInfo), one node at a time for single-node modes, the
    same publish again is fine, another capability on the same node is ALREADY_EXISTS."""
    caps = nfs_driver.controller.ControllerGetCapabilities(
        pb.ControllerGetCapabilitiesRequest()).capabilities
    advertised = {c.rpc.type for c in caps}
    RPC = pb.ControllerServiceCapability.RPC
    assert {RPC.PUBLISH_UNPUBLISH_VOLUME, RPC.PUBLISH_READONLY} <= advertised
    here = nfs_driver.node.NodeGetInfo(pb.NodeGetInfoRequest()).node_id
    nodes = nfs_server.export_dir / ".berth" / "nodes"
    assert (nodes / f"{here}.json").exists()  # NodeGetInfo registered it
    (nodes / "node-b.json").write_text("{}")  # a second node, as its NodeGetInfo would write
    vol = create(nfs_driver, name, mode=Mode.SINGLE_NODE_WRITER, volumeLayout="image")
    cap = mount_cap(Mode.SINGLE_NODE_WRITER)

    def publish(node: str, c: pb.VolumeCapability = cap, readonly: bool = False,
                volume_id: str = vol.volume_id) -> grpc.StatusCode:
        return status_of(lambda: nfs_driver.controller.ControllerPublishVolume(
            pb.ControllerPublishVolumeRequest(volume_id=volume_id, node_id=node,
                                              volume_capability=c, readonly=readonly)))

    def unpublish(node: str, volume_id: str = vol.volume_id) -> grpc.StatusCode:
        return status_of(lambda: nfs_driver.controller.ControllerUnpublishVolume(
            pb.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=node)))

    assert publish("") == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(lambda: nfs_driver.controller.ControllerPublishVolume(
        pb.ControllerPublishVolumeRequest(volume_id=vol.volume_id, node_id=here))
    ) == grpc.StatusCode.INVALID_ARGUMENT  # no capability
    assert publish(here, volume_id="nfs:pvc-never-made") == grpc.StatusCode.NOT_FOUND
    assert publish(here, volume_id="elsewhere:x") == grpc.StatusCode.NOT_FOUND
    assert publish("some-fake-node-id") == grpc.StatusCode.NOT_FOUND
    assert publish("../../etc") == grpc.StatusCode.NOT_FOUND
    assert publish(here, pb.VolumeCapability(
        block=pb.VolumeCapability.BlockVolume(), access_mode=cap.access_mode)
    ) == grpc.StatusCode.INVALID_ARGUMENT  # a filesystem image published as block

    # A node that staged it still has its marker there (a force-detached node, or one from
    # before the attach step): nobody else may attach it.
    image_dir = nfs_server.export_dir / name
    (image_dir / "attached").write_text("old-node")
    assert publish(here) == grpc.StatusCode.FAILED_PRECONDITION
    (image_dir / "attached").unlink()

    assert publish(here) == grpc.StatusCode.OK
    assert publish(here) == grpc.StatusCode.OK  # idempotent
    # LIST_VOLUMES_PUBLISHED_NODES: what the external-attacher reconciles against.
    assert RPC.LIST_VOLUMES_PUBLISHED_NODES in advertised
    listed = {e.volume.volume_id: list(e.status.published_node_ids) for e in
              nfs_driver.controller.ListVolumes(pb.ListVolumesRequest()).entries}
    assert listed[vol.volume_id] == [here]
    got = nfs_driver.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(
        volume_id=vol.volume_id))
    assert list(got.status.published_node_ids) == [here]
    assert publish(here, readonly=True) == grpc.StatusCode.ALREADY_EXISTS
    assert publish("node-b") == grpc.StatusCode.FAILED_PRECONDITION
    assert status_of(lambda: nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(
        volume_id=vol.volume_id))) == grpc.StatusCode.FAILED_PRECONDITION

    # Nothing can be attached to a node or of a volume we cannot find: OK, as the spec asks.
    assert unpublish("some-fake-node-id") == grpc.StatusCode.OK
    assert unpublish(here, volume_id="nfs:pvc-never-made") == grpc.StatusCode.OK
    assert unpublish(here, volume_id="elsewhere:x") == grpc.StatusCode.OK
    assert status_of(lambda: nfs_driver.controller.ControllerUnpublishVolume(
        pb.ControllerUnpublishVolumeRequest(node_id=here))) == grpc.StatusCode.INVALID_ARGUMENT
    assert unpublish("node-b") == grpc.StatusCode.OK  # not published there: nothing to do
    assert publish("node-b") == grpc.StatusCode.FAILED_PRECONDITION
    assert unpublish(here) == grpc.StatusCode.OK
    assert unpublish(here) == grpc.StatusCode.OK  # idempotent
    assert publish("node-b") == grpc.StatusCode.OK  # free again
    assert unpublish("") == grpc.StatusCode.OK  # from every node
    local = vol.volume_id.split(":", 1)[1]
    assert not (nfs_server.export_dir / ".berth" / "attachments" / f"{local}.json").exists()

    # Directory volumes are recorded too (csi-sanity publishes one twice with another
    # read-only setting): shared by any number of nodes in a multi-node mode, one node in a
    # single-node mode.
    shared = create(nfs_driver, name + "-dir")
    rwx = mount_cap(Mode.MULTI_NODE_MULTI_WRITER)
    assert publish(here, rwx, volume_id=shared.volume_id) == grpc.StatusCode.OK
    assert publish("node-b", rwx, volume_id=shared.volume_id) == grpc.StatusCode.OK
    assert publish("node-b", rwx, readonly=True, volume_id=shared.volume_id
                   ) == grpc.StatusCode.ALREADY_EXISTS
    assert unpublish("", volume_id=shared.volume_id) == grpc.StatusCode.OK
    assert publish(here, volume_id=shared.volume_id) == grpc.StatusCode.OK
    assert publish("node-b", volume_id=shared.volume_id) == grpc.StatusCode.FAILED_PRECONDITION
    assert unpublish(here, volume_id=shared.volume_id) == grpc.StatusCode.OK
    for v in (vol, shared):
        nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id))
    (nodes / "node-b.json").unlink()


def test_mixed_config_with_attach(nfs_server: NfsServer, tmp_path: Path, name: str) -> None:
    """hostPath beside NFS: attach is advertised (the CSIDriver is attachRequired for the
    driver as a whole), and a hostPath volume's ControllerPublish/Unpublish answer at once with
    an empty context, then stage and publish as ever."""
    driver = start_nfs_driver(nfs_server, tmp_path, {
        "nfs": nfs_backend(nfs_server),
        "local": {"type": "hostpath", "path": str(tmp_path / "hp")}})
    try:
        node_id = driver.node.NodeGetInfo(pb.NodeGetInfoRequest()).node_id
        vol = create(driver, name, backend="local", mode=Mode.SINGLE_NODE_WRITER)
        cap = mount_cap(Mode.SINGLE_NODE_WRITER)
        started = time.monotonic()
        published = driver.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, node_id=node_id, volume_capability=cap))
        assert dict(published.publish_context) == {}
        assert time.monotonic() - started < 1
        staging, target = tmp_path / "staging", tmp_path / "target"
        staging.mkdir()
        driver.node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging), volume_capability=cap,
            publish_context=published.publish_context, volume_context=vol.volume_context))
        driver.node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging), target_path=str(target),
            volume_capability=cap, publish_context=published.publish_context))
        (target / "data").write_text("ok")
        driver.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(
            volume_id=vol.volume_id, target_path=str(target)))
        driver.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging)))
        driver.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
            volume_id=vol.volume_id, node_id=node_id))
        driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    finally:
        assert driver.stop() == 0, driver.log()


def test_copy_of_a_live_volume(nfs_server: NfsServer, name: str) -> None:
    """What a pod does to its volume while the copy runs, between the walk and the file copies:
    files deleted (left out, not a failed copy: a busy volume's temporary files would otherwise
    fail every attempt), a directory deleted, a file shrunk (copied at its new length, not
    padded with zeros), and a copy file already there (a CREATE libnfs resent after a
    reconnect, which the server had done: the file is ours)."""
    export = nfs_server.export_dir
    source = export / name
    (source / "gone-dir").mkdir(parents=True)
    (source / "gone-dir" / "f").write_bytes(b"x" * 100)
    for i in range(40):
        (source / f"small-{i}").write_bytes(os.urandom(1000 + i))
    (source / "big-gone").write_bytes(os.urandom(3 << 20))  # over the pipelines' limit
    (source / "shrinks").write_bytes(b"abcdefghij" + bytes(100_000))
    (source / "big-shrinks").write_bytes(os.urandom(3 << 20))
    done = _copy_racing(nfs_server, f"/{name}", f"/{name}-copy",
                        "where, copy = args\n"
                        "for i in range(0, 40, 3):\n"
                        "    os.unlink(f'{where}/small-{i}')\n"
                        "os.unlink(f'{where}/big-gone')\n"
                        "os.unlink(f'{where}/gone-dir/f')\n"
                        "os.truncate(f'{where}/shrinks', 10)\n"
                        "os.truncate(f'{where}/big-shrinks', 1 << 20 | 5)\n"
                        "open(f'{copy}/small-1', 'wb').write(b'left by a first CREATE')\n",
                        str(source), str(export / f"{name}-copy"))
    assert done.returncode == 0 and "refused" not in done.stdout, (done.stdout, done.stderr)
    copy = export / f"{name}-copy"
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in source.iterdir())
    for p in source.iterdir():
        if p.is_file():
            assert (copy / p.name).read_bytes() == p.read_bytes(), p.name
    assert (copy / "shrinks").stat().st_size == 10
    assert (copy / "big-shrinks").stat().st_size == 1 << 20 | 5
    assert list((copy / "gone-dir").iterdir()) == []


def test_no_publish_while_a_copy_runs_and_node_plugins_leave_copies_alone(
        nfs_server: NfsServer, tmp_path: Path, name: str) -> None:
    """An image is not published while a snapshot of it is being copied (the copy would be
    torn); a retried CreateSnapshot after a publish is refused; and a node plugin starting
    meanwhile (a DaemonSet pod) leaves the controller's copy in .berth/tmp alone."""
    (tmp_path / "c").mkdir()
    driver = start_nfs_driver(nfs_server, tmp_path / "c", {"nfs": nfs_backend(
        nfs_server, copyWaitSeconds=1)})
    try:
        here = driver.node.NodeGetInfo(pb.NodeGetInfoRequest()).node_id
        vol = create(driver, name, size=10 << 30, mode=Mode.SINGLE_NODE_WRITER,
                     volumeLayout="image")
        image = nfs_server.export_dir / name / "disk.img"
        with open(image, "r+b") as f:  # data spread through 10 GiB: seconds to read it all
            for i in range(64):
                f.seek(i * (160 << 20))
                f.write(os.urandom(1 << 20))
        request = pb.CreateSnapshotRequest(name=name + "-snap", source_volume_id=vol.volume_id)
        assert not driver.controller.CreateSnapshot(request, timeout=30).snapshot.ready_to_use
        cap = mount_cap(Mode.SINGLE_NODE_WRITER)
        publish = pb.ControllerPublishVolumeRequest(volume_id=vol.volume_id, node_id=here,
                                                    volume_capability=cap)
        assert status_of(lambda: driver.controller.ControllerPublishVolume(publish)
                         ) == grpc.StatusCode.ABORTED
        (tmp_path / "n").mkdir()
        node = start_nfs_driver(nfs_server, tmp_path / "n", None, "--mode", "node",
                                "--node-id", "plugin-2")
        try:
            node.node.NodeGetInfo(pb.NodeGetInfoRequest())
        finally:
            node.stop()
        snap = snapshot_ready(driver, name + "-snap", vol.volume_id, timeout=120)
        copy = nfs_server.export_dir / ".berth" / "snapshots" / snap.snapshot_id.split(":")[1]
        assert subprocess.run(["cmp", str(image), str(copy / "disk.img")]).returncode == 0
        driver.controller.ControllerPublishVolume(publish)  # the copy is done: fine now
        driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
        # A copy starting again (its snapshot was deleted and is retried) checks afresh.
        assert status_of(lambda: driver.controller.CreateSnapshot(request, timeout=30)
                         ) == grpc.StatusCode.FAILED_PRECONDITION
        driver.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
            volume_id=vol.volume_id, node_id=here))
        driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    finally:
        assert driver.stop() == 0, driver.log()


def test_node_get_info_answers_with_the_server_down(nfs_server: NfsServer, tmp_path: Path,
                                                    name: str) -> None:
    """A node whose NFS server does not answer still registers with kubelet (its other
    backends stay usable); it registers with the NFS backend once the server is back."""
    nodes = nfs_server.export_dir / ".berth" / "nodes"
    driver = start_nfs_driver(nfs_server, tmp_path, {"nfs": nfs_backend(
        nfs_server, timeoutSeconds=2)}, "--mode", "node", "--node-id", "late-node")
    try:
        assert nfs_server.ganesha is not None
        os.kill(nfs_server.ganesha.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            info = driver.node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=30)
            assert info.node_id == "late-node"
            assert time.monotonic() - started < 8
        finally:
            os.kill(nfs_server.ganesha.pid, signal.SIGCONT)
        wait_for(lambda: (nodes / "late-node.json").exists(), timeout=60)
    finally:
        driver.stop()
        (nodes / "late-node.json").unlink(missing_ok=True)


def test_changed_blocks_are_refused_with_the_reason(nfs_driver: Driver, name: str) -> None:
    """libnfs has no NFSv4.2 SEEK, so the backend cannot tell where an image's data lies or
    what changed: both SnapshotMetadata RPCs answer FAILED_PRECONDITION (the spec's "take a
    full backup"), and the plugin does not advertise the service for an NFS-only driver."""
    vol = create(nfs_driver, name, mode=Mode.SINGLE_NODE_WRITER, volumeLayout="image")
    snaps = [snapshot_ready(nfs_driver, f"{name}-{i}", vol.volume_id).snapshot_id
             for i in (1, 2)]
    calls = [lambda: list(nfs_driver.metadata.GetMetadataAllocated(
                 pb.GetMetadataAllocatedRequest(snapshot_id=snaps[0]))),
             lambda: list(nfs_driver.metadata.GetMetadataDelta(pb.GetMetadataDeltaRequest(
                 base_snapshot_id=snaps[0], target_snapshot_id=snaps[1])))]
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "NFSv4.2 SEEK" in (err.value.details() or "")
    # An unknown snapshot is still NOT_FOUND, before any of that.
    assert status_of(lambda: list(nfs_driver.metadata.GetMetadataAllocated(
        pb.GetMetadataAllocatedRequest(snapshot_id=f"{vol.volume_id}x")))
                     ) == grpc.StatusCode.NOT_FOUND
    caps = nfs_driver.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest())
    assert pb.PluginCapability.Service.SNAPSHOT_METADATA_SERVICE not in {
        c.service.type for c in caps.capabilities}
    for s in snaps:
        nfs_driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=s))
    nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
