"""NFS node service inside a User-Mode Linux guest, whose real kernel NFS client mounts the real
Ganesha: data written on one side is read on the other; stale handles, a restarted and a stopped
server."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import grpc
import pytest

from csi_driver.csi import csi_pb2 as pb
from csi_driver.csi import csi_pb2_grpc as pb_grpc

from ..conftest import status_of
from ..harness import Driver, MiB, mount_cap
from .guest import Guest
from .server import NfsServer

Mode = pb.VolumeCapability.AccessMode.Mode


class Published:
    """A volume made by the controller, staged and published by the node in the guest."""

    def __init__(self, controller: Driver, node: pb_grpc.NodeStub, guest: Guest, name: str,
                 mode: int = Mode.MULTI_NODE_MULTI_WRITER, readonly: bool = False,
                 **params: str) -> None:
        self.node, self.guest, self.controller = node, guest, controller
        self.volume = controller.controller.CreateVolume(pb.CreateVolumeRequest(
            name=name, capacity_range=pb.CapacityRange(required_bytes=10 * MiB),
            volume_capabilities=[mount_cap(mode)], parameters={"backend": "nfs", **params}),
            timeout=30).volume
        self.cap = mount_cap(mode)
        self.staging, self.target = f"/mnt/{name}/staging", f"/mnt/{name}/target"
        self.readonly = readonly
        self.stage()

    def stage(self) -> None:
        """ControllerPublish to the guest (as the attacher would: the NFS backend attaches),
        then NodeStage and NodePublish, always with CreateVolume's volume context."""
        node, guest = self.node, self.guest
        self.node_id = node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=30).node_id
        self.controller.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=self.volume.volume_id, node_id=self.node_id, volume_capability=self.cap,
            readonly=self.readonly), timeout=30)
        assert guest.run(["mkdir", "-p", self.staging]).returncode == 0
        started = time.monotonic()
        node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=self.volume.volume_id, staging_target_path=self.staging,
            volume_capability=self.cap, volume_context=self.volume.volume_context), timeout=60)
        self.stage_s = time.monotonic() - started
        started = time.monotonic()
        self.publish()
        self.publish_s = time.monotonic() - started

    def publish(self) -> None:
        self.node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=self.volume.volume_id, staging_target_path=self.staging,
            target_path=self.target, volume_capability=self.cap, readonly=self.readonly,
            volume_context=self.volume.volume_context), timeout=60)

    def sh(self, script: str) -> str:
        done = self.guest.run(["sh", "-c", script], timeout=30)
        assert done.returncode == 0, (script, done.stdout, done.stderr)
        return done.stdout

    def stats(self) -> pb.NodeGetVolumeStatsResponse:
        return self.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
            volume_id=self.volume.volume_id, volume_path=self.target), timeout=60)

    def teardown(self, controller: Driver) -> None:
        self.teardown_node()
        controller.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
            volume_id=self.volume.volume_id, node_id=self.node_id), timeout=30)
        controller.controller.DeleteVolume(pb.DeleteVolumeRequest(
            volume_id=self.volume.volume_id), timeout=30)

    def teardown_node(self) -> None:
        self.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(
            volume_id=self.volume.volume_id, target_path=self.target), timeout=60)
        self.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
            volume_id=self.volume.volume_id, staging_target_path=self.staging), timeout=60)
        assert self.volume.volume_context["subDir"] not in self.sh("cat /proc/self/mountinfo")
        assert "/dev/loop" not in self.sh("losetup -a")


@pytest.mark.parametrize("version", ["4.1", "4.2", "3"])
def test_lifecycle_moves_data_both_ways(nfs_driver: Driver, nfs_server: NfsServer,
                                        node: pb_grpc.NodeStub, guest: Guest, name: str,
                                        version: str) -> None:
    params = {"nfsVersion": version, **({"mountOptions": "nolock"} if version == "3" else {})}
    vol = Published(nfs_driver, node, guest, name, **params)
    print(f"\nNFS v{version}: NodeStage {vol.stage_s * 1000:.0f} ms, "
          f"NodePublish {vol.publish_s * 1000:.0f} ms")
    mounted = vol.sh(f"grep ' {vol.staging} ' /proc/self/mountinfo")
    assert f"vers={version}" in mounted and f"{nfs_server.address}:/export/{name}" in mounted
    vol.sh(f"echo from-the-pod > {vol.target}/pod.txt")
    on_server = nfs_server.export_dir / name
    assert (on_server / "pod.txt").read_text() == "from-the-pod\n"
    (on_server / "server.txt").write_text("from-the-server")
    assert vol.sh(f"cat {vol.target}/server.txt") == "from-the-server"
    # Megabytes, not just a line: each way, checksummed on the other side.
    payload = os.urandom(8 * MiB)
    (on_server / "big").write_bytes(payload)
    assert vol.sh(f"sha256sum < {vol.target}/big").split()[0] == \
        hashlib.sha256(payload).hexdigest()
    digest = vol.sh(f"head -c {8 * MiB} /dev/urandom | tee {vol.target}/from-pod | sha256sum")
    assert hashlib.sha256((on_server / "from-pod").read_bytes()).hexdigest() == digest.split()[0]
    vol.publish()  # repeated: nothing changes
    stats = vol.stats()
    assert not stats.volume_condition.abnormal
    assert stats.usage[0].total > 0
    vol.teardown(nfs_driver)
    assert not on_server.exists()


def test_read_only_publish(nfs_driver: Driver, nfs_server: NfsServer, node: pb_grpc.NodeStub,
                           guest: Guest, name: str) -> None:
    vol = Published(nfs_driver, node, guest, name, readonly=True)
    (nfs_server.export_dir / name / "seen").write_text("yes")
    assert vol.sh(f"cat {vol.target}/seen") == "yes"
    done = guest.run(["sh", "-c", f"echo no > {vol.target}/written"])
    assert done.returncode != 0 and "Read-only file system" in done.stderr
    vol.teardown(nfs_driver)


def test_stale_handle_is_remounted(nfs_driver: Driver, nfs_server: NfsServer,
                                   node: pb_grpc.NodeStub, guest: Guest, name: str) -> None:
    vol = Published(nfs_driver, node, guest, name)
    place = nfs_server.export_dir / name
    (place / "old").write_text("old")
    assert vol.sh(f"cat {vol.target}/old") == "old"
    # A Ganesha restart alone keeps handles valid: the mount goes on working.
    nfs_server.restart()
    assert vol.sh(f"cat {vol.target}/old") == "old"
    # The directory replaced on the server: the mount's handle now points at nothing.
    shutil.rmtree(place)
    place.mkdir(mode=0o777)
    (place / "new").write_text("new")
    stale = guest.run(["ls", vol.target])  # stat alone may answer from the attribute cache
    assert stale.returncode != 0 and "Stale file handle" in stale.stderr
    condition = vol.stats().volume_condition
    assert condition.abnormal and "stale" in condition.message.lower()
    vol.publish()  # kubelet's next publish: the driver remounts instead of failing
    assert vol.sh(f"cat {vol.target}/new") == "new"
    assert not vol.stats().volume_condition.abnormal
    vol.teardown(nfs_driver)


def test_server_gone_unpublish_does_not_hang(nfs_driver: Driver, nfs_server: NfsServer,
                                             node: pb_grpc.NodeStub, guest: Guest,
                                             name: str) -> None:
    vol = Published(nfs_driver, node, guest, name)
    vol.sh(f"ls {vol.target}")
    nfs_server.stop_ganesha()
    try:
        started = time.monotonic()
        condition = vol.stats().volume_condition
        assert condition.abnormal and "answer" in condition.message
        assert time.monotonic() - started < 20
        # kubelet republishing meanwhile gets an answer, and leaves the volume unlocked.
        started = time.monotonic()
        try:
            vol.publish()
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
        assert time.monotonic() - started < 30
        started = time.monotonic()
        node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(
            volume_id=vol.volume.volume_id, target_path=vol.target), timeout=60)
        node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
            volume_id=vol.volume.volume_id, staging_target_path=vol.staging), timeout=60)
        took = time.monotonic() - started
        print(f"\nunpublish + unstage with the server gone: {took:.1f} s")
        assert took < 30
        assert f"/export/{name}" not in vol.sh("cat /proc/self/mountinfo")
    finally:
        nfs_server.start()
    nfs_driver.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
        volume_id=vol.volume.volume_id, node_id=vol.node_id), timeout=30)
    nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume.volume_id))


def test_unknown_export_at_stage(nfs_driver: Driver, node: pb_grpc.NodeStub, guest: Guest,
                                 name: str) -> None:
    vol = Published(nfs_driver, node, guest, name)
    staging = f"/mnt/{name}/other"
    assert guest.run(["mkdir", "-p", staging]).returncode == 0
    context = {**vol.volume.volume_context, "share": "/no-such-export"}
    with pytest.raises(grpc.RpcError) as err:
        node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=vol.volume.volume_id, staging_target_path=staging,
            volume_capability=vol.cap, volume_context=context), timeout=60)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()
    vol.teardown(nfs_driver)


def test_modified_mount_settings_apply_at_next_stage(
        nfs_driver: Driver, nfs_server: NfsServer, node: pb_grpc.NodeStub, guest: Guest,
        name: str) -> None:
    vol = Published(nfs_driver, node, guest, name, nfsVersion="4.1")
    line = vol.sh(f"grep ' {vol.staging} ' /proc/self/mountinfo")
    assert "vers=4.1" in line and "noac" not in line
    nfs_driver.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
        volume_id=vol.volume.volume_id,
        mutable_parameters={"nfsVersion": "4.2", "mountOptions": "noac"}), timeout=30)
    # Staged already: nothing changes under a running pod.
    assert vol.sh(f"grep ' {vol.staging} ' /proc/self/mountinfo") == line
    vol.teardown_node()
    # The CO passes CreateVolume's context again; the node must find the news itself.
    vol.stage()
    line = vol.sh(f"grep ' {vol.staging} ' /proc/self/mountinfo")
    assert "vers=4.2" in line and ",noac" in line, line
    vol.teardown(nfs_driver)


def test_guest_driver_log_has_no_traceback(guest: Guest) -> None:
    assert "Traceback" not in guest.driver_log()



def test_image_layout_enforces_size_and_survives_restore(
        nfs_driver: Driver, nfs_server: NfsServer, node: pb_grpc.NodeStub, guest: Guest,
        name: str) -> None:
    """An ext4 image on a loop device over the guest's NFS mount: the size is enforced,
    expansion grows it online, and a snapshot restores the data into a new volume."""
    vol = Published(nfs_driver, node, guest, name, mode=Mode.SINGLE_NODE_WRITER,
                    volumeLayout="image")
    print(f"\nimage layout: NodeStage (NFS mount + loop + mkfs + mount) "
          f"{vol.stage_s * 1000:.0f} ms, NodePublish {vol.publish_s * 1000:.0f} ms")
    assert "ext4" in vol.sh(f"grep ' {vol.staging} ' /proc/self/mountinfo")
    vol.sh(f"echo kept > {vol.target}/data && sync")
    full = guest.run(["dd", "if=/dev/zero", f"of={vol.target}/fill", "bs=1M", "count=20"])
    assert full.returncode != 0 and "No space left" in full.stderr  # 10 MiB volume
    vol.sh(f"rm {vol.target}/fill && sync")
    before = vol.stats().usage[0].total
    # Published to this node only: a second node (the host's node service, registered by its
    # NodeGetInfo) is refused, and the image is not copied, nor deleted, while published.
    local = vol.volume.volume_id.split(":", 1)[1]
    attachments = nfs_server.export_dir / ".berth" / "attachments" / f"{local}.json"
    assert list(json.loads(attachments.read_text())["nodes"]) == ["uml-node"]
    host = nfs_driver.node.NodeGetInfo(pb.NodeGetInfoRequest()).node_id
    assert status_of(lambda: nfs_driver.controller.ControllerPublishVolume(
        pb.ControllerPublishVolumeRequest(volume_id=vol.volume.volume_id, node_id=host,
                                          volume_capability=vol.cap))
    ) == grpc.StatusCode.FAILED_PRECONDITION
    assert status_of(lambda: nfs_driver.controller.CreateSnapshot(pb.CreateSnapshotRequest(
        name=name + "-early", source_volume_id=vol.volume.volume_id))
    ) == grpc.StatusCode.FAILED_PRECONDITION
    assert status_of(lambda: nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(
        volume_id=vol.volume.volume_id))) == grpc.StatusCode.FAILED_PRECONDITION

    nfs_driver.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vol.volume.volume_id, capacity_range=pb.CapacityRange(required_bytes=40 * MiB),
        volume_capability=vol.cap))
    node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
        volume_id=vol.volume.volume_id, volume_path=vol.target, staging_target_path=vol.staging,
        capacity_range=pb.CapacityRange(required_bytes=40 * MiB), volume_capability=vol.cap),
        timeout=60)
    assert vol.stats().usage[0].total > before + 20 * MiB

    # Unstaged first: a copy of a mounted image would be torn.
    node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(
        volume_id=vol.volume.volume_id, target_path=vol.target), timeout=60)
    node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
        volume_id=vol.volume.volume_id, staging_target_path=vol.staging), timeout=60)
    assert "/dev/loop" not in guest.run(["losetup", "-a"]).stdout
    nfs_driver.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
        volume_id=vol.volume.volume_id, node_id=vol.node_id))
    assert not attachments.exists()
    snap = nfs_driver.controller.CreateSnapshot(pb.CreateSnapshotRequest(
        name=name + "-snap", source_volume_id=vol.volume.volume_id), timeout=30).snapshot
    while not snap.ready_to_use:
        time.sleep(0.1)
        snap = nfs_driver.controller.CreateSnapshot(pb.CreateSnapshotRequest(
            name=name + "-snap", source_volume_id=vol.volume.volume_id), timeout=30).snapshot
    restored = nfs_driver.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name + "-restored", capacity_range=pb.CapacityRange(required_bytes=40 * MiB),
        volume_capabilities=[mount_cap(Mode.SINGLE_NODE_WRITER)],
        parameters={"backend": "nfs", "volumeLayout": "image"},
        volume_content_source=pb.VolumeContentSource(
            snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id))),
        timeout=60).volume
    staging = f"/mnt/{name}-restored/staging"
    assert guest.run(["mkdir", "-p", staging]).returncode == 0
    stage = pb.NodeStageVolumeRequest(
        volume_id=restored.volume_id, staging_target_path=staging, volume_capability=vol.cap,
        volume_context=restored.volume_context)
    # Not published to this node yet (the attach step comes first): the node refuses it.
    assert status_of(lambda: node.NodeStageVolume(stage, timeout=60)
                     ) == grpc.StatusCode.FAILED_PRECONDITION
    nfs_driver.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=restored.volume_id, node_id=vol.node_id, volume_capability=vol.cap))
    node.NodeStageVolume(stage, timeout=60)
    assert vol.sh(f"cat {staging}/data") == "kept\n"
    node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
        volume_id=restored.volume_id, staging_target_path=staging), timeout=60)
    nfs_driver.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
        volume_id=restored.volume_id, node_id=vol.node_id))
    for v in (restored.volume_id, vol.volume.volume_id):
        nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v))
    nfs_driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))


def test_image_layout_block_access(nfs_driver: Driver, node: pb_grpc.NodeStub, guest: Guest,
                                   name: str) -> None:
    cap = pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(),
                              access_mode=pb.VolumeCapability.AccessMode(
                                  mode=Mode.SINGLE_NODE_WRITER))
    vol = nfs_driver.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name, capacity_range=pb.CapacityRange(required_bytes=16 * MiB),
        volume_capabilities=[cap], parameters={"backend": "nfs", "volumeLayout": "image"}),
        timeout=30).volume
    staging, target = f"/mnt/{name}/staging", f"/mnt/{name}/dev"
    assert guest.run(["mkdir", "-p", staging]).returncode == 0
    node_id = node.NodeGetInfo(pb.NodeGetInfoRequest()).node_id
    nfs_driver.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=vol.volume_id, node_id=node_id, volume_capability=cap))
    node.NodeStageVolume(pb.NodeStageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=staging, volume_capability=cap,
        volume_context=vol.volume_context), timeout=60)
    node.NodePublishVolume(pb.NodePublishVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=staging, target_path=target,
        volume_capability=cap, volume_context=vol.volume_context), timeout=60)
    size = guest.run(["blockdev", "--getsize64", target])
    assert size.returncode == 0 and int(size.stdout) == 16 * MiB
    written = guest.run(["sh", "-c", f"echo raw | dd of={target} conv=fsync 2>/dev/null && "
                                     f"head -c 3 {target}"])
    assert written.stdout == "raw"
    node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(
        volume_id=vol.volume_id, target_path=target), timeout=60)
    node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=staging), timeout=60)
    nfs_driver.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
        volume_id=vol.volume_id, node_id=node_id))
    nfs_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
