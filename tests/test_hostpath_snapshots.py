"""hostPath snapshots, restores, clones and group snapshots: data as it was at snapshot time,
metadata preserved, blocks shared on reflink filesystems, spec error codes."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver.csi import csi_pb2 as pb

from .conftest import needs_root, status_of
from .harness import (
    Driver,
    MiB,
    mount_cap,
    mount_filesystem,
    start_driver,
    unmount_filesystem,
    write_config,
)
from .test_node import stage, unstage

pytestmark = needs_root
Src = pb.VolumeContentSource


@pytest.fixture(scope="module", params=["xfs", "ext4"])
def fsd(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Driver]:
    """A driver whose backend lives on xfs (reflinks) or ext4 (plain copies)."""
    tmp = tmp_path_factory.mktemp(f"snap-{request.param}")
    mnt = mount_filesystem(tmp, request.param)
    d = start_driver(tmp, write_config(tmp / "c.yaml", {"local": {
        "type": "hostpath", "path": str(mnt / "berth")}}))
    d.fs = request.param  # type: ignore[attr-defined]
    d.mnt = mnt  # type: ignore[attr-defined]
    yield d
    assert d.stop() == 0
    unmount_filesystem(mnt)


def volumes_dir(d: Driver) -> Path:
    return d.mnt / "berth" / "volumes"  # type: ignore[attr-defined,no-any-return]


def data_of(d: Driver, volume_id: str) -> Path:
    return volumes_dir(d) / volume_id.split(":", 1)[1]


def create(d: Driver, name: str, size: int = 64 * MiB, source: Src | None = None,
           **params: str) -> pb.Volume:
    req = pb.CreateVolumeRequest(name=name, capacity_range=pb.CapacityRange(required_bytes=size),
                                 volume_capabilities=[mount_cap()], parameters=params)
    if source is not None:
        req.volume_content_source.CopyFrom(source)
    return d.controller.CreateVolume(req).volume


def snapshot(d: Driver, name: str, volume_id: str) -> pb.Snapshot:
    return d.controller.CreateSnapshot(pb.CreateSnapshotRequest(
        name=name, source_volume_id=volume_id)).snapshot


def from_snapshot(snap_id: str) -> Src:
    return Src(snapshot=Src.SnapshotSource(snapshot_id=snap_id))


def from_volume(volume_id: str) -> Src:
    return Src(volume=Src.VolumeSource(volume_id=volume_id))


def fill(root: Path) -> None:
    """Files that exercise what a copy must keep."""
    (root / "dir").mkdir()
    (root / "dir" / "file").write_text("v1")
    os.chmod(root / "dir" / "file", 0o640)
    os.chown(root / "dir" / "file", 1234, 5678)
    os.utime(root / "dir" / "file", (1_000_000_000, 1_000_000_000))
    os.setxattr(root / "dir" / "file", "user.berth", b"kept")
    os.symlink("dir/file", root / "link")
    os.link(root / "dir" / "file", root / "hardlink")
    with open(root / "sparse", "wb") as f:
        f.truncate(512 * MiB)
        f.seek(100 * MiB)
        f.write(b"middle")


def check_fill(root: Path) -> None:
    st = os.stat(root / "dir" / "file")
    assert (root / "dir" / "file").read_text() == "v1"
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid, int(st.st_mtime)) == (
        0o640, 1234, 5678, 1_000_000_000)
    assert os.getxattr(root / "dir" / "file", "user.berth") == b"kept"
    assert os.readlink(root / "link") == "dir/file"
    assert os.stat(root / "hardlink").st_ino == st.st_ino
    sparse = os.stat(root / "sparse")
    assert sparse.st_size == 512 * MiB and sparse.st_blocks * 512 < 8 * MiB


def test_snapshot_restore_and_clone_keep_data_and_metadata(fsd: Driver) -> None:
    vol = create(fsd, "origin")
    fill(data_of(fsd, vol.volume_id))
    snap = snapshot(fsd, "snap-1", vol.volume_id)
    assert snap.ready_to_use and snap.source_volume_id == vol.volume_id
    assert snap.size_bytes == vol.capacity_bytes and snap.creation_time.seconds > 0
    (data_of(fsd, vol.volume_id) / "dir" / "file").write_text("v2 after the snapshot")
    restored = create(fsd, "restored", source=from_snapshot(snap.snapshot_id))
    clone = create(fsd, "clone", source=from_volume(vol.volume_id))
    try:
        assert restored.content_source.snapshot.snapshot_id == snap.snapshot_id
        assert clone.content_source.volume.volume_id == vol.volume_id
        check_fill(data_of(fsd, restored.volume_id))
        assert (data_of(fsd, clone.volume_id) / "dir" / "file").read_text().startswith("v2")
        # The source may go away; copies are independent.
        fsd.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
        check_fill(data_of(fsd, restored.volume_id))
        again = create(fsd, "restored-2", source=from_snapshot(snap.snapshot_id))
        check_fill(data_of(fsd, again.volume_id))
        fsd.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=again.volume_id))
    finally:
        for v in (restored, clone):
            fsd.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id))
        fsd.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_snapshot_shares_blocks_on_xfs(fsd: Driver) -> None:
    vol = create(fsd, "big")
    with open(data_of(fsd, vol.volume_id) / "blob", "wb") as f:
        for _ in range(128):
            f.write(os.urandom(MiB))
        os.fsync(f.fileno())
    before = used_bytes(fsd.mnt)  # type: ignore[attr-defined]
    snap = snapshot(fsd, "big-snap", vol.volume_id)
    grown = used_bytes(fsd.mnt) - before  # type: ignore[attr-defined]
    try:
        if fsd.fs == "xfs":  # type: ignore[attr-defined]
            assert grown < 16 * MiB, f"a reflink snapshot copied {grown} bytes"
        else:
            assert grown >= 128 * MiB, "ext4 has no reflinks: the data is copied"
    finally:
        fsd.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
        fsd.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))


def test_image_snapshot_restores_into_larger_volume(fsd: Driver, tmp_path: Path) -> None:
    vol = create(fsd, "img-src", 32 * MiB, layout="image")
    staging = tmp_path / "s"
    staging.mkdir()
    stage(fsd, vol.volume_id, str(staging))
    (staging / "at-snapshot").write_text("then")
    snap = snapshot(fsd, "img-snap", vol.volume_id)  # taken while staged: frozen, consistent
    (staging / "after").write_text("later")
    unstage(fsd, vol.volume_id, str(staging))
    big = create(fsd, "img-big", 128 * MiB, source=from_snapshot(snap.snapshot_id),
                 layout="image")
    try:
        assert big.capacity_bytes == 128 * MiB
        stage(fsd, big.volume_id, str(staging))
        assert (staging / "at-snapshot").read_text() == "then"
        assert not (staging / "after").exists()
        st = os.statvfs(staging)
        assert st.f_blocks * st.f_frsize > 96 * MiB  # the filesystem grew to the volume
        unstage(fsd, big.volume_id, str(staging))
        code = status_of(lambda: create(fsd, "img-as-dir", source=from_snapshot(
            snap.snapshot_id)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT  # an image cannot become a directory
    finally:
        for v in (vol, big):
            fsd.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id))
        fsd.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))


def test_snapshot_errors(fsd: Driver) -> None:
    vol = create(fsd, "snap-err")
    other = create(fsd, "snap-err-2")
    snap = snapshot(fsd, "once", vol.volume_id)
    try:
        assert snapshot(fsd, "once", vol.volume_id) == snap  # idempotent
        cases = [
            (pb.CreateSnapshotRequest(source_volume_id=vol.volume_id),
             grpc.StatusCode.INVALID_ARGUMENT),
            (pb.CreateSnapshotRequest(name="x"), grpc.StatusCode.INVALID_ARGUMENT),
            (pb.CreateSnapshotRequest(name="x", source_volume_id="local:nope"),
             grpc.StatusCode.NOT_FOUND),
            (pb.CreateSnapshotRequest(name="x", source_volume_id="junk"),
             grpc.StatusCode.NOT_FOUND),
            (pb.CreateSnapshotRequest(name="once", source_volume_id=other.volume_id),
             grpc.StatusCode.ALREADY_EXISTS),
        ]
        for req, code in cases:
            assert status_of(lambda r=req: fsd.controller.CreateSnapshot(r)) == code  # type: ignore[misc]
        code = status_of(lambda: create(fsd, "too-small", 1 * MiB,
                                        source=from_snapshot(snap.snapshot_id)))
        assert code == grpc.StatusCode.OK  # required_bytes is a floor: the copy is bigger
        code = status_of(lambda: fsd.controller.CreateVolume(pb.CreateVolumeRequest(
            name="limited", volume_capabilities=[mount_cap()],
            capacity_range=pb.CapacityRange(limit_bytes=MiB),
            volume_content_source=from_snapshot(snap.snapshot_id))))
        assert code == grpc.StatusCode.OUT_OF_RANGE
        assert status_of(lambda: fsd.controller.DeleteSnapshot(
            pb.DeleteSnapshotRequest())) == grpc.StatusCode.INVALID_ARGUMENT
        for sid in ("local:nope", "junk"):
            fsd.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=sid))
        assert status_of(lambda: fsd.controller.GetSnapshot(pb.GetSnapshotRequest(
            snapshot_id="local:nope"))) == grpc.StatusCode.NOT_FOUND
        got = fsd.controller.GetSnapshot(pb.GetSnapshotRequest(snapshot_id=snap.snapshot_id))
        assert got.snapshot == snap
    finally:
        listed = fsd.controller.ListVolumes(pb.ListVolumesRequest()).entries
        for e in listed:
            fsd.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=e.volume.volume_id))
        fsd.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))


def test_list_snapshots_filters_and_pages(fsd: Driver) -> None:
    a, b = create(fsd, "list-a"), create(fsd, "list-b")
    snaps = [snapshot(fsd, f"la-{i}", a.volume_id) for i in range(3)]
    snaps.append(snapshot(fsd, "lb-0", b.volume_id))
    try:
        def ids(**kw: object) -> list[str]:
            resp = fsd.controller.ListSnapshots(pb.ListSnapshotsRequest(**kw))
            return [e.snapshot.snapshot_id for e in resp.entries]

        assert sorted(ids()) == sorted(s.snapshot_id for s in snaps)
        assert sorted(ids(source_volume_id=a.volume_id)) == sorted(
            s.snapshot_id for s in snaps[:3])
        assert ids(snapshot_id=snaps[3].snapshot_id) == [snaps[3].snapshot_id]
        assert ids(snapshot_id="local:nope") == [] and ids(snapshot_id="junk") == []
        assert ids(source_volume_id="local:nope") == []
        seen, token = [], ""
        while True:
            resp = fsd.controller.ListSnapshots(pb.ListSnapshotsRequest(max_entries=1,
                                                                        starting_token=token))
            seen += [e.snapshot.snapshot_id for e in resp.entries]
            token = resp.next_token
            if not token:
                break
        assert sorted(seen) == sorted(s.snapshot_id for s in snaps)
        assert status_of(lambda: fsd.controller.ListSnapshots(pb.ListSnapshotsRequest(
            starting_token="bogus"))) == grpc.StatusCode.ABORTED
    finally:
        for s in snaps:
            fsd.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=s.snapshot_id))
        for v in (a, b):
            fsd.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id))


# -- group snapshots -----------------------------------------------------------------------------
def group_req(name: str, *volume_ids: str) -> pb.CreateVolumeGroupSnapshotRequest:
    return pb.CreateVolumeGroupSnapshotRequest(name=name, source_volume_ids=list(volume_ids))


def test_group_snapshot_is_consistent_across_volumes(fsd: Driver, tmp_path: Path) -> None:
    from csi_driver.csi import csi_pb2_grpc as pb_grpc

    groups = pb_grpc.GroupControllerStub(fsd.channel)
    caps = groups.GroupControllerGetCapabilities(pb.GroupControllerGetCapabilitiesRequest())
    assert [c.rpc.type for c in caps.capabilities] == [
        pb.GroupControllerServiceCapability.RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT]
    img = create(fsd, "g-img", 32 * MiB, layout="image")
    plain = create(fsd, "g-dir")
    staging = tmp_path / "s"
    staging.mkdir()
    stage(fsd, img.volume_id, str(staging))
    stop = threading.Event()
    counter = staging / "counter"

    def writer() -> None:  # a steady writer: the frozen snapshot must hold a complete value
        n = 0
        while not stop.is_set():
            n += 1
            # Write then rename: every state of the filesystem holds a whole value (a freeze
            # between an in-place truncate and its write would rightly snapshot an empty file).
            (staging / "counter.new").write_text(str(n) * 100)
            os.replace(staging / "counter.new", counter)
            time.sleep(0.001)

    t = threading.Thread(target=writer)
    t.start()
    try:
        (data_of(fsd, plain.volume_id) / "f").write_text("dir member")
        group = groups.CreateVolumeGroupSnapshot(group_req("g1", img.volume_id,
                                                           plain.volume_id)).group_snapshot
    finally:
        stop.set()
        t.join()
    try:
        assert group.ready_to_use and len(group.snapshots) == 2
        assert {s.source_volume_id for s in group.snapshots} == {img.volume_id, plain.volume_id}
        assert all(s.group_snapshot_id == group.group_snapshot_id for s in group.snapshots)
        again = groups.CreateVolumeGroupSnapshot(group_req("g1", img.volume_id,
                                                           plain.volume_id)).group_snapshot
        assert again == group
        code = status_of(lambda: groups.CreateVolumeGroupSnapshot(group_req("g1",
                                                                            img.volume_id)))
        assert code == grpc.StatusCode.ALREADY_EXISTS
        got = groups.GetVolumeGroupSnapshot(pb.GetVolumeGroupSnapshotRequest(
            group_snapshot_id=group.group_snapshot_id)).group_snapshot
        assert got == group
        member = next(s for s in group.snapshots if s.source_volume_id == img.volume_id)
        code = status_of(lambda: fsd.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(
            snapshot_id=member.snapshot_id)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        unstage(fsd, img.volume_id, str(staging))
        restored = create(fsd, "g-restore", 32 * MiB, source=from_snapshot(member.snapshot_id),
                          layout="image")
        stage(fsd, restored.volume_id, str(staging))
        value = counter.read_text()
        assert value and value == value[: len(value) // 100] * 100  # never a torn write
        unstage(fsd, restored.volume_id, str(staging))
        fsd.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=restored.volume_id))
        code = status_of(lambda: groups.DeleteVolumeGroupSnapshot(
            pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id,
                                                snapshot_ids=[member.snapshot_id])))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        groups.DeleteVolumeGroupSnapshot(pb.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=group.group_snapshot_id,
            snapshot_ids=[s.snapshot_id for s in group.snapshots]))
        groups.DeleteVolumeGroupSnapshot(pb.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=group.group_snapshot_id))  # idempotent
        left = fsd.controller.ListSnapshots(pb.ListSnapshotsRequest()).entries
        assert not {e.snapshot.snapshot_id for e in left} & {s.snapshot_id
                                                             for s in group.snapshots}
        assert status_of(lambda: groups.GetVolumeGroupSnapshot(pb.GetVolumeGroupSnapshotRequest(
            group_snapshot_id=group.group_snapshot_id))) == grpc.StatusCode.NOT_FOUND
    finally:
        for v in (img, plain):
            fsd.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id))


def test_group_snapshot_errors(fsd: Driver) -> None:
    from csi_driver.csi import csi_pb2_grpc as pb_grpc

    groups = pb_grpc.GroupControllerStub(fsd.channel)
    vol = create(fsd, "g-err")
    try:
        for req, code in [
            (group_req("", vol.volume_id), grpc.StatusCode.INVALID_ARGUMENT),
            (group_req("g"), grpc.StatusCode.INVALID_ARGUMENT),
            (group_req("g", vol.volume_id, vol.volume_id), grpc.StatusCode.INVALID_ARGUMENT),
            (group_req("g", vol.volume_id, "local:nope"), grpc.StatusCode.NOT_FOUND),
        ]:
            assert status_of(lambda r=req: groups.CreateVolumeGroupSnapshot(r)) == code  # type: ignore[misc]
        assert status_of(lambda: groups.DeleteVolumeGroupSnapshot(
            pb.DeleteVolumeGroupSnapshotRequest())) == grpc.StatusCode.INVALID_ARGUMENT
        groups.DeleteVolumeGroupSnapshot(pb.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id="local:nope"))
    finally:
        fsd.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))


def test_nothing_left_behind(fsd: Driver) -> None:
    root = fsd.mnt / "berth"  # type: ignore[attr-defined]
    for sub in ("volumes", "snapshots", "groups", ".tmp", ".trash"):
        assert list((root / sub).iterdir()) == [], sub
    out = subprocess.run(["losetup", "-j", str(root / "volumes")], capture_output=True,
                         text=True).stdout
    assert out == ""


# -- copies that do not fit ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    """A driver whose backend is a 64 MiB ext4 (plain copies) with 2,048 inodes."""
    tmp = tmp_path_factory.mktemp("tiny")
    image, mnt = tmp / "fs.img", tmp / "mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-N", "2048", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    d = start_driver(tmp, write_config(tmp / "c.yaml", {"local": {
        "type": "hostpath", "path": str(mnt / "berth")}}))
    d.mnt = mnt  # type: ignore[attr-defined]
    yield d
    assert d.stop() == 0
    unmount_filesystem(mnt)


def copies_fail_cleanly(d: Driver, small: pb.Volume, full: pb.Volume, says: str) -> None:
    """A snapshot, a clone and a group snapshot of `full` end RESOURCE_EXHAUSTED (the message
    saying `says`) and leave nothing behind: no half-made copy, record or group member."""
    from csi_driver.csi import csi_pb2_grpc as pb_grpc

    groups = pb_grpc.GroupControllerStub(d.channel)
    calls = {
        "snapshot": lambda: snapshot(d, "no-room", full.volume_id),
        "clone": lambda: create(d, "no-room", MiB, source=from_volume(full.volume_id)),
        # `small` first: its member is made before `full`'s fails, and must go again.
        "group": lambda: groups.CreateVolumeGroupSnapshot(
            group_req("no-room", small.volume_id, full.volume_id)),
    }
    for what, call in calls.items():
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (what, err.value)
        assert says in err.value.details(), what
    root = d.mnt / "berth"  # type: ignore[attr-defined]
    for sub in ("snapshots", "groups", ".tmp", ".trash"):
        assert list((root / sub).iterdir()) == [], sub
    assert sorted(p.name for p in (root / "volumes").iterdir()) == sorted(
        v.volume_id.split(":", 1)[1] for v in (small, full))
    assert list(d.controller.ListSnapshots(pb.ListSnapshotsRequest()).entries) == []


def test_copy_of_more_data_than_is_free_is_refused_before_copying(tiny: Driver) -> None:
    small, full = create(tiny, "room-small", MiB), create(tiny, "room-full", MiB)
    blob = data_of(tiny, full.volume_id) / "blob"
    try:
        # A directory volume's size is not enforced: 40 MiB of data (not zeros, which a sparse
        # copy would skip) in a 1 MiB volume, on a filesystem with less than that left.
        with open(blob, "wb") as f:
            for _ in range(40):
                f.write(b"\1" * MiB)
            os.fsync(f.fileno())
        st = os.statvfs(blob)
        assert st.f_bavail * st.f_frsize < 40 * MiB
        copies_fail_cleanly(tiny, small, full, "the copy needs about")
        blob.unlink()  # room again: the same snapshot works
        snap = snapshot(tiny, "room-after", full.volume_id)
        tiny.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    finally:
        for v in (small, full):
            tiny.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id))


def test_running_out_during_the_copy_is_resource_exhausted(tiny: Driver) -> None:
    """Empty files take no blocks, so the check before copying passes; the copy then runs out
    of inodes, which the filesystem reports as ENOSPC."""
    small, full = create(tiny, "inodes-small", MiB), create(tiny, "inodes-full", MiB)
    many = data_of(tiny, full.volume_id) / "many"
    try:
        many.mkdir()
        for i in range(os.statvfs(many).f_favail * 2 // 3):
            (many / str(i)).touch()
        copies_fail_cleanly(tiny, small, full, "No space left on device")
    finally:
        for v in (small, full):
            tiny.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id))


def test_copies_that_share_blocks_need_no_room(tmp_path: Path) -> None:
    """On xfs with reflinks a copy needs next to no space: more data than is free is fine."""
    mnt = mount_filesystem(tmp_path, "xfs", size="320M")  # mkfs.xfs's minimum is 300 MB
    d = start_driver(tmp_path, write_config(tmp_path / "c.yaml", {"local": {
        "type": "hostpath", "path": str(mnt / "berth")}}))
    d.mnt = mnt  # type: ignore[attr-defined]
    try:
        vol = create(d, "shared", MiB)
        with open(data_of(d, vol.volume_id) / "blob", "wb") as f:
            for _ in range(200):
                f.write(b"\1" * MiB)
            os.fsync(f.fileno())
        st = os.statvfs(mnt)
        assert st.f_bavail * st.f_frsize < 200 * MiB
        snap = snapshot(d, "shared-snap", vol.volume_id)
        clone = create(d, "shared-clone", MiB, source=from_volume(vol.volume_id))
        assert (data_of(d, clone.volume_id) / "blob").stat().st_size == 200 * MiB
        d.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=clone.volume_id))
        d.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
        d.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    finally:
        assert d.stop() == 0
        unmount_filesystem(mnt)
