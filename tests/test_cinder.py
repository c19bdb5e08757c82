"""The Cinder backend against a real Keystone and a real Cinder (tests/openstack) whose RBD volume
driver keeps volumes on the session's real Ceph, in two availability zones.

`cinder` attach mode runs for real end to end: Cinder attachments with rbd connection info, which
the node connects through the RBD backend's rbd-fuse mounter, with data written, detached,
attached on a second node (a second driver process) and read back. `nova` mode runs against the
real Nova of tests/openstack (fake virt driver): ControllerPublish/Unpublish go through Nova's
volume-attachment API for real, but the fake driver puts no disk in any machine, so the node's
/dev/disk/by-id lookup is tested with by-id links this test makes to a loop device.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from csi_driver.csi import csi_pb2 as pb

from .ceph.cluster import CephCluster
from .conftest import needs_root, status_of
from .harness import NODE_ID, Driver, GiB, block_cap, mount_cap, start_driver, write_config
from .openstack.fixtures import OpenStack

pytestmark = needs_root
Code = grpc.StatusCode
Mode = pb.VolumeCapability.AccessMode.Mode
Src = pb.VolumeContentSource
ZONE = "topology.kubernetes.io/zone"
NODE_2 = "cinder-node-2"
GONE_NODE = "cinder-node-gone"
WAIT = 60
ANY_ZONE_TYPE = "berth-any-zone"  # a type on no particular Cinder backend: both zones take it


# -- set-up -----------------------------------------------------------------------------------
def clouds_file(cloud: OpenStack, path: Path, password: str | None = None) -> Path:
    path.write_text(yaml.safe_dump({"clouds": {"test": {
        "auth": {"auth_url": cloud.auth_url, "username": cloud.username,
                 "password": cloud.password if password is None else password,
                 "project_name": cloud.project, "user_domain_name": "Default",
                 "project_domain_name": "Default"},
        "region_name": cloud.region}}}))
    path.chmod(0o600)
    return path


def backend_config(cloud: OpenStack, tmp: Path, **extra: Any) -> dict[str, Any]:
    keyfile = tmp / "cinder.key"
    keyfile.write_text(cloud.cinder_key)
    config = {"type": "cinder", "cloudsFile": str(clouds_file(cloud, tmp / "clouds.yaml")),
              "cloud": "test", "availabilityZones": ["az1", "az2"], "volumeType": ANY_ZONE_TYPE,
              "attach": "cinder", "timeoutSeconds": 5, "waitSeconds": 20,
              "nodes": {NODE_ID: {}, NODE_2: {}, GONE_NODE: {}},
              "rbdMounter": "fuse", "rbdUserKeyFile": str(keyfile),
              "nodeStateDir": str(tmp / "node")}
    config.update(extra)
    return config


@pytest.fixture(scope="module")
def cloud(openstack_cloud: OpenStack) -> OpenStack:
    admin = openstack_cloud.admin()
    if not any(t.name == ANY_ZONE_TYPE for t in admin.block_storage.types()):
        admin.block_storage.create_type(name=ANY_ZONE_TYPE)
    return openstack_cloud


@pytest.fixture(scope="module")
def cinder(cloud: OpenStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    tmp = tmp_path_factory.mktemp("cinder")
    d = start_driver(tmp, write_config(tmp / "c.yaml", {"os": backend_config(cloud, tmp)}),
                     "--topology", f"{ZONE}=az1")
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture(scope="module")
def node2(cloud: OpenStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    """A second node: a node-only driver process with its own node ID and state."""
    tmp = tmp_path_factory.mktemp("cinder-node2")
    d = start_driver(tmp, write_config(tmp / "c.yaml", {"os": backend_config(cloud, tmp)}),
                     "--node-id", NODE_2, "--mode", "node", "--topology", f"{ZONE}=az1")
    yield d
    assert d.stop() == 0, d.log()


def create(d: Driver, name: str, size: int = GiB, source: Src | None = None,
           cap: pb.VolumeCapability | None = None, secrets: dict[str, str] | None = None,
           **params: str) -> pb.Volume:
    answer: pb.CreateVolumeResponse = d.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name, capacity_range=pb.CapacityRange(required_bytes=size),
        volume_capabilities=[cap or mount_cap()], parameters=params,
        volume_content_source=source, secrets=secrets or {}), timeout=WAIT)
    return answer.volume


def delete(d: Driver, vid: str) -> None:
    d.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=WAIT)


def c_publish(d: Driver, vid: str, node: str, cap: pb.VolumeCapability | None = None,
              readonly: bool = False) -> dict[str, str]:
    answer = d.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=vid, node_id=node, volume_capability=cap or mount_cap(), readonly=readonly),
        timeout=WAIT)
    return dict(answer.publish_context)


def c_unpublish(d: Driver, vid: str, node: str) -> None:
    d.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
        volume_id=vid, node_id=node), timeout=WAIT)


def cinder_id(vid: str) -> str:
    return vid.partition(":")[2]


@contextlib.contextmanager
def on_node(controller: Driver, node: Driver, node_id: str, vol: pb.Volume, where: Path,
            cap: pb.VolumeCapability | None = None) -> Iterator[Path]:
    """Published to the node, staged and published there, as the CO does; undone afterwards."""
    cap = cap or mount_cap()
    ctx = c_publish(controller, vol.volume_id, node_id, cap)
    staging, target = where / "staging", where / "target"
    staging.mkdir(parents=True, exist_ok=True)
    try:
        node.node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging), volume_capability=cap,
            publish_context=ctx, volume_context=vol.volume_context), timeout=WAIT)
        node.node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging), target_path=str(target),
            volume_capability=cap, publish_context=ctx, volume_context=vol.volume_context),
            timeout=WAIT)
        try:
            yield target
        finally:
            node.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(
                volume_id=vol.volume_id, target_path=str(target)), timeout=WAIT)
            node.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
                volume_id=vol.volume_id, staging_target_path=str(staging)), timeout=WAIT)
    finally:
        c_unpublish(controller, vol.volume_id, node_id)


def our_volumes(cloud: OpenStack) -> list[Any]:
    return [v for v in cloud.user().block_storage.volumes(details=True)
            if (v.metadata or {}).get("berth.backend") == "os"]


def rbd_images(cluster: CephCluster) -> list[str]:
    return sorted(cluster.rbd("ls", "volumes").split() + cluster.rbd("ls", "volumes2").split())


def attachments_of(cloud: OpenStack, volume_id: str) -> list[dict[str, Any]]:
    resp = cloud.admin().block_storage.get(f"/attachments?volume_id={volume_id}&all_tenants=1",
                                           microversion="3.54")
    return list(resp.json()["attachments"])


# -- the lifecycle ----------------------------------------------------------------------------
def test_lifecycle_with_real_data_across_two_nodes(cinder: Driver, node2: Driver, cloud: OpenStack,
                                                   ceph_cluster: CephCluster, tmp_path: Path
                                                   ) -> None:
    data = uuid.uuid4().hex
    name = f"life-{uuid.uuid4().hex[:6]}"
    vol = create(cinder, name)
    vid = cinder_id(vol.volume_id)
    assert vol.capacity_bytes == GiB
    assert [dict(t.segments) for t in vol.accessible_topology] == [{ZONE: "az1"}]
    assert f"volume-{vid}" in rbd_images(ceph_cluster)  # a real RBD image behind it
    with on_node(cinder, cinder, NODE_ID, vol, tmp_path / "n1") as target:
        (target / "data").write_text(data)
        os.sync()
        assert attachments_of(cloud, vid)[0]["status"] == "attached"
        # A single-node volume stays on one node.
        assert status_of(lambda: c_publish(cinder, vol.volume_id, NODE_2)
                         ) == Code.FAILED_PRECONDITION
    assert attachments_of(cloud, vid) == []
    snap = cinder.controller.CreateSnapshot(pb.CreateSnapshotRequest(
        source_volume_id=vol.volume_id, name=f"{name}-snap"), timeout=WAIT).snapshot
    assert snap.ready_to_use and snap.source_volume_id == vol.volume_id
    # Grown while detached: Cinder grows the image, the next stage the filesystem (ext4 cannot
    # grow online here: root lacks CAP_SYS_RESOURCE; test_xfs_grows_online grows one online).
    grown = cinder.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=2 * GiB),
        volume_capability=mount_cap()), timeout=WAIT)
    assert grown.capacity_bytes == 2 * GiB and grown.node_expansion_required
    # The second node reads what the first wrote.
    with on_node(cinder, node2, NODE_2, vol, tmp_path / "n2") as target:
        assert (target / "data").read_text() == data
        stats = node2.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
            volume_id=vol.volume_id, volume_path=str(target)), timeout=WAIT)
        assert next(u.total for u in stats.usage if u.unit == pb.VolumeUsage.BYTES) > 1.5 * GiB
        (target / "data").write_text("changed after the snapshot")
        os.sync()
    restored = create(cinder, f"{name}-restored", source=Src(
        snapshot=Src.SnapshotSource(snapshot_id=snap.snapshot_id)))
    clone = create(cinder, f"{name}-clone", size=2 * GiB, source=Src(
        volume=Src.VolumeSource(volume_id=vol.volume_id)))
    assert restored.capacity_bytes == GiB and clone.capacity_bytes == 2 * GiB
    with on_node(cinder, cinder, NODE_ID, restored, tmp_path / "r") as target:
        assert (target / "data").read_text() == data
    with on_node(cinder, node2, NODE_2, clone, tmp_path / "c") as target:
        assert (target / "data").read_text() == "changed after the snapshot"
    # The source has a snapshot: Cinder's snapshots depend on their volume.
    assert status_of(lambda: delete(cinder, vol.volume_id)) == Code.FAILED_PRECONDITION
    for v in (restored, clone):
        delete(cinder, v.volume_id)
    cinder.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id),
                                     timeout=WAIT)
    delete(cinder, vol.volume_id)
    delete(cinder, vol.volume_id)  # idempotent
    assert [v for v in our_volumes(cloud) if v.name.startswith(name)] == []
    assert not [i for i in rbd_images(ceph_cluster) if vid in i]
    assert list(cloud.user().block_storage.snapshots(name=f"{name}-snap")) == []


def test_xfs_grows_online(cinder: Driver, tmp_path: Path) -> None:
    """An attached (in-use) volume extended through Cinder's microversion 3.42, then its
    filesystem grown by the node while mounted."""
    cap = mount_cap(fs_type="xfs")
    vol = create(cinder, f"xfs-{uuid.uuid4().hex[:6]}", cap=cap)
    try:
        with on_node(cinder, cinder, NODE_ID, vol, tmp_path, cap) as target:
            before = os.statvfs(target)
            grown = cinder.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
                volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=2 * GiB),
                volume_capability=cap), timeout=WAIT)
            assert grown.capacity_bytes == 2 * GiB and grown.node_expansion_required
            done = cinder.node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
                volume_id=vol.volume_id, volume_path=str(target),
                capacity_range=pb.CapacityRange(required_bytes=2 * GiB),
                staging_target_path=str(tmp_path / "staging"), volume_capability=cap),
                timeout=WAIT)
            assert done.capacity_bytes == 2 * GiB
            after = os.statvfs(target)
            assert after.f_blocks * after.f_frsize > before.f_blocks * before.f_frsize + GiB // 2
    finally:
        delete(cinder, vol.volume_id)


def test_block_volume_moves_bytes(cinder: Driver, tmp_path: Path) -> None:
    vol = create(cinder, f"blk-{uuid.uuid4().hex[:6]}", cap=block_cap())
    data = uuid.uuid4().hex.encode()
    try:
        with on_node(cinder, cinder, NODE_ID, vol, tmp_path, block_cap()) as target, \
                open(target, "r+b") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with on_node(cinder, cinder, NODE_ID, vol, tmp_path, block_cap()) as target, \
                open(target, "rb") as f:
            assert f.read(len(data)) == data
    finally:
        delete(cinder, vol.volume_id)


def test_create_is_idempotent_by_name(cinder: Driver, cloud: OpenStack) -> None:
    name = f"idem-{uuid.uuid4().hex[:6]}"
    first = create(cinder, name)
    try:
        assert create(cinder, name).volume_id == first.volume_id
        assert len([v for v in our_volumes(cloud) if v.name == name]) == 1
        assert status_of(lambda: create(cinder, name, size=3 * GiB)) == Code.ALREADY_EXISTS
        got = cinder.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(
            volume_id=first.volume_id), timeout=WAIT)
        assert not got.status.volume_condition.abnormal
    finally:
        delete(cinder, first.volume_id)


# -- topology ---------------------------------------------------------------------------------
def test_zones_from_requisite_and_preferred(cinder: Driver, cloud: OpenStack) -> None:
    def placed(requisite: list[str], preferred: list[str]) -> pb.Volume:
        req = pb.CreateVolumeRequest(
            name=f"zone-{uuid.uuid4().hex[:6]}", volume_capabilities=[mount_cap()],
            capacity_range=pb.CapacityRange(required_bytes=GiB),
            accessibility_requirements=pb.TopologyRequirement(
                requisite=[pb.Topology(segments={ZONE: z}) for z in requisite],
                preferred=[pb.Topology(segments={ZONE: z}) for z in preferred]))
        return cinder.controller.CreateVolume(req, timeout=WAIT).volume

    made = []
    try:
        made.append(placed(["az1", "az2"], ["az2", "az1"]))
        made.append(placed(["az2"], []))
        made.append(placed(["az1", "az2"], ["az1"]))
        zones = [dict(v.accessible_topology[0].segments)[ZONE] for v in made]
        assert zones == ["az2", "az2", "az1"]
        for v in made:  # what Cinder says, not only what we report
            data = cloud.user().block_storage.get_volume(cinder_id(v.volume_id))
            assert data.availability_zone == dict(v.accessible_topology[0].segments)[ZONE]
        assert status_of(lambda: placed(["az9"], [])) == Code.RESOURCE_EXHAUSTED
    finally:
        for v in made:
            delete(cinder, v.volume_id)
    info = cinder.node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=WAIT)
    assert dict(info.accessible_topology.segments)[ZONE] == "az1"


# -- credentials ------------------------------------------------------------------------------
def test_wrong_password_is_unauthenticated_quickly(cinder: Driver, cloud: OpenStack) -> None:
    secrets = {"auth_url": cloud.auth_url, "username": cloud.username, "password": "wrong",
               "project_name": cloud.project, "user_domain_name": "Default",
               "project_domain_name": "Default"}
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        create(cinder, f"pw-{uuid.uuid4().hex[:6]}", secrets=secrets)
    assert time.monotonic() - started < 2
    assert err.value.code() in (Code.UNAUTHENTICATED, Code.PERMISSION_DENIED)
    assert "requires authentication" in (err.value.details() or "")
    assert "wrong" not in (err.value.details() or "")


def test_application_credential_secrets(cinder: Driver, cloud: OpenStack) -> None:
    cred_id, secret = cloud.application_credential(f"berth-{uuid.uuid4().hex[:6]}")
    secrets = {"auth_url": cloud.auth_url, "application_credential_id": cred_id,
               "application_credential_secret": secret}
    vol = create(cinder, f"appcred-{uuid.uuid4().hex[:6]}", secrets=secrets)
    cinder.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id,
                                                          secrets=secrets), timeout=WAIT)
    assert cinder.log().count(secret) == 0


def test_secrets_never_reach_the_log(cinder: Driver, cloud: OpenStack) -> None:
    # Runs after the tests above (same module): the clouds.yaml password and those secrets.
    log = cinder.log()
    assert cloud.password not in log
    assert cloud.cinder_key not in log


# -- faults -----------------------------------------------------------------------------------
def test_quota_exceeded_is_resource_exhausted(cinder: Driver, cloud: OpenStack) -> None:
    used = len(list(cloud.user().block_storage.volumes()))
    cloud.set_quota(volumes=used)
    try:
        with pytest.raises(grpc.RpcError) as err:
            create(cinder, f"quota-{uuid.uuid4().hex[:6]}")
        assert err.value.code() == Code.RESOURCE_EXHAUSTED
        assert "VolumeLimitExceeded" in (err.value.details() or "")
    finally:
        cloud.set_quota(volumes=-1)


def test_capacity_follows_the_gigabytes_quota(cinder: Driver, cloud: OpenStack) -> None:
    cloud.set_quota(gigabytes=500)
    try:
        cap = cinder.controller.GetCapacity(pb.GetCapacityRequest(), timeout=WAIT)
        user = cloud.user().block_storage  # snapshots count against the gigabytes quota too
        used = sum(v.size for v in user.volumes()) + sum(s.size for s in user.snapshots())
        assert cap.available_capacity == (500 - used) * GiB
    finally:
        cloud.set_quota(gigabytes=-1)
    unlimited = status_of(lambda: cinder.controller.GetCapacity(pb.GetCapacityRequest(),
                                                                 timeout=WAIT))
    assert unlimited == Code.FAILED_PRECONDITION


def test_keystone_and_cinder_unreachable_are_unavailable(cloud: OpenStack, tmp_path: Path) -> None:
    # A driver of its own: a fresh connection must authenticate (an old one holds a token).
    d = start_driver(tmp_path, write_config(tmp_path / "c.yaml", {
        "os": backend_config(cloud, tmp_path, timeoutSeconds=1)}))
    try:
        for stop, start, what in ((cloud.pause_keystone, cloud.resume_keystone, "keystone"),
                                  (cloud.pause_cinder, cloud.resume_cinder, "cinder")):
            stop()
            try:
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as err:
                    create(d, f"down-{what}-{uuid.uuid4().hex[:6]}")
                assert err.value.code() == Code.UNAVAILABLE, (what, err.value.details())
                assert time.monotonic() - started < 8, what
            finally:
                start()
    finally:
        assert d.stop() == 0


def test_stuck_creating_is_deadline_exceeded_then_finished(cloud: OpenStack, tmp_path: Path,
                                                           ceph_cluster: CephCluster) -> None:
    d = start_driver(tmp_path, write_config(tmp_path / "c.yaml", {
        "os": backend_config(cloud, tmp_path, waitSeconds=2)}))
    osd = ceph_cluster._daemons["osd.0"]
    name = f"stuck-{uuid.uuid4().hex[:6]}"
    try:
        os.kill(osd.pid, signal.SIGSTOP)
        try:
            with pytest.raises(grpc.RpcError) as err:
                create(d, name)
            assert err.value.code() == Code.DEADLINE_EXCEEDED, err.value.details()
        finally:
            os.kill(osd.pid, signal.SIGCONT)
        vol = create(d, name)  # the same volume, now finished
        assert len([v for v in our_volumes(cloud) if v.name == name]) == 1
        delete(d, vol.volume_id)
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("point", ["create-volume", "publish"])
def test_kill_9_then_retry_leaves_one_of_each(cloud: OpenStack, tmp_path: Path, point: str
                                              ) -> None:
    config = write_config(tmp_path / "c.yaml", {"os": backend_config(cloud, tmp_path)})
    name = f"kill-{point}-{uuid.uuid4().hex[:6]}"
    d = start_driver(tmp_path, config)
    if point == "publish":
        vol = create(d, name)
    d.stop()
    d = start_driver(tmp_path, config, env={"BERTH_FAULTS": point})
    with pytest.raises(grpc.RpcError):
        if point == "create-volume":
            create(d, name)
        else:
            c_publish(d, vol.volume_id, NODE_ID)
    assert d.proc.wait(10) == -signal.SIGKILL
    d = start_driver(tmp_path, config)
    try:
        vol = create(d, name)
        assert len([v for v in our_volumes(cloud) if v.name == name]) == 1
        if point == "publish":
            ctx = c_publish(d, vol.volume_id, NODE_ID)
            held = attachments_of(cloud, cinder_id(vol.volume_id))
            assert [a["id"] for a in held] == [ctx["cinder/attachment"]]
            c_unpublish(d, vol.volume_id, NODE_ID)
            assert attachments_of(cloud, cinder_id(vol.volume_id)) == []
        delete(d, vol.volume_id)
    finally:
        assert d.stop() == 0


def test_unpublish_cleans_the_attachment_of_a_gone_node(cinder: Driver, cloud: OpenStack) -> None:
    vol = create(cinder, f"gone-{uuid.uuid4().hex[:6]}")
    try:
        ctx = c_publish(cinder, vol.volume_id, GONE_NODE)  # a node that never comes to stage
        assert ctx["cinder/type"] == "rbd"
        assert len(attachments_of(cloud, cinder_id(vol.volume_id))) == 1
        assert status_of(lambda: delete(cinder, vol.volume_id)) == Code.FAILED_PRECONDITION
        c_unpublish(cinder, vol.volume_id, GONE_NODE)
        assert attachments_of(cloud, cinder_id(vol.volume_id)) == []
        assert cloud.user().block_storage.get_volume(cinder_id(vol.volume_id)).status == "available"
        assert status_of(lambda: c_publish(cinder, vol.volume_id, "never-configured")
                         ) == Code.NOT_FOUND
    finally:
        delete(cinder, vol.volume_id)


# -- modify, multi-attach, lists ---------------------------------------------------------------
def test_modify_volume_retypes(cinder: Driver, cloud: OpenStack) -> None:
    vol = create(cinder, f"retype-{uuid.uuid4().hex[:6]}")  # az1
    try:
        cinder.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
            volume_id=vol.volume_id, mutable_parameters={"type": "ceph1"}), timeout=WAIT)
        got = cloud.user().block_storage.get_volume(cinder_id(vol.volume_id))
        assert got.volume_type == "ceph1"
        # ceph2 lives in az2 only: Cinder accepts and does nothing; we say so.
        with pytest.raises(grpc.RpcError) as err:
            cinder.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
                volume_id=vol.volume_id, mutable_parameters={"type": "ceph2"}), timeout=WAIT)
        assert err.value.code() == Code.FAILED_PRECONDITION
        assert "ceph1" in (err.value.details() or "")
    finally:
        delete(cinder, vol.volume_id)


def test_multi_attach_type_allows_multi_node_block(cinder: Driver, node2: Driver,
                                                   tmp_path: Path) -> None:
    cap = block_cap(Mode.MULTI_NODE_MULTI_WRITER)
    assert status_of(lambda: create(cinder, f"multi-no-{uuid.uuid4().hex[:6]}", cap=cap)
                     ) == Code.INVALID_ARGUMENT  # the default type is not multi-attach
    assert status_of(lambda: create(cinder, f"multi-fs-{uuid.uuid4().hex[:6]}",
                                    cap=mount_cap(Mode.MULTI_NODE_MULTI_WRITER),
                                    type="ceph1-multi")) == Code.INVALID_ARGUMENT
    vol = create(cinder, f"multi-{uuid.uuid4().hex[:6]}", cap=cap, type="ceph1-multi")
    try:
        data = uuid.uuid4().hex.encode()
        with on_node(cinder, cinder, NODE_ID, vol, tmp_path / "a", cap) as one, \
                on_node(cinder, node2, NODE_2, vol, tmp_path / "b", cap) as two:
            with open(one, "r+b") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            with open(two, "rb", buffering=0) as f:
                fd = f.fileno()
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                assert os.pread(fd, len(data), 0) == data
    finally:
        delete(cinder, vol.volume_id)


def test_list_volumes_and_snapshots_in_pages(cinder: Driver) -> None:
    made = [create(cinder, f"page-{i}-{uuid.uuid4().hex[:6]}") for i in range(3)]
    snaps = [cinder.controller.CreateSnapshot(pb.CreateSnapshotRequest(
        source_volume_id=made[0].volume_id, name=f"page-snap-{i}-{uuid.uuid4().hex[:6]}"),
        timeout=WAIT).snapshot for i in range(2)]
    try:
        seen, token = [], ""
        while True:
            page = cinder.controller.ListVolumes(pb.ListVolumesRequest(
                max_entries=1, starting_token=token), timeout=WAIT)
            assert len(page.entries) <= 1
            seen += [e.volume.volume_id for e in page.entries]
            token = page.next_token
            if not token:
                break
        assert {v.volume_id for v in made} <= set(seen) and len(seen) == len(set(seen))
        listed = cinder.controller.ListSnapshots(pb.ListSnapshotsRequest(
            source_volume_id=made[0].volume_id, max_entries=1), timeout=WAIT)
        assert len(listed.entries) == 1 and listed.next_token
        one = cinder.controller.ListSnapshots(pb.ListSnapshotsRequest(
            snapshot_id=snaps[1].snapshot_id), timeout=WAIT)
        assert [e.snapshot.snapshot_id for e in one.entries] == [snaps[1].snapshot_id]
    finally:
        for s in snaps:
            cinder.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=s.snapshot_id),
                                             timeout=WAIT)
        for v in made:
            delete(cinder, v.volume_id)


def test_foreign_cinder_volume_is_not_deleted(cinder: Driver, cloud: OpenStack) -> None:
    foreign = cloud.user().block_storage.create_volume(size=1, name="not-berths")
    try:
        cloud.user().block_storage.wait_for_status(foreign, "available", wait=30)
        assert status_of(lambda: delete(cinder, f"os:{foreign.id}")) == Code.FAILED_PRECONDITION
        assert status_of(lambda: cinder.controller.ControllerGetVolume(
            pb.ControllerGetVolumeRequest(volume_id=f"os:{foreign.id}"), timeout=WAIT)
        ) == Code.NOT_FOUND
    finally:
        cloud.user().block_storage.delete_volume(foreign)


# -- nova -------------------------------------------------------------------------------------
@pytest.fixture
def by_id(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory standing in for /dev/disk/by-id and a loop device to link from it: Nova's
    fake virt driver attaches no disk to any machine."""
    backing = tmp_path / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(GiB)
    device = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                            capture_output=True, text=True).stdout.strip()
    links = tmp_path / "by-id"
    links.mkdir()
    try:
        yield links, device
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def test_nova_attach(nova_cloud: Any, cloud: OpenStack, tmp_path: Path,
                     by_id: tuple[Path, str]) -> None:
    links, device = by_id
    server_name = f"berth-node-{uuid.uuid4().hex[:6]}"
    server = nova_cloud.boot_server(server_name)
    config = backend_config(cloud, tmp_path, attach="nova", devicesDir=str(links), nodes={})
    d = start_driver(tmp_path, write_config(tmp_path / "c.yaml", {"os": config}),
                     "--node-id", server_name, "--topology", f"{ZONE}=az1")
    try:
        vol = create(d, f"nova-{uuid.uuid4().hex[:6]}")
        vid = cinder_id(vol.volume_id)
        assert status_of(lambda: c_publish(d, vol.volume_id, "no-such-server")) == Code.NOT_FOUND
        ctx = c_publish(d, vol.volume_id, server_name)
        assert ctx == {"cinder/server": server}
        got = cloud.user().block_storage.get_volume(vid)
        assert got.status == "in-use"
        assert [a["server_id"] for a in got.attachments] == [server]
        assert c_publish(d, vol.volume_id, server_name) == ctx  # idempotent
        (links / f"virtio-{vid[:20]}").symlink_to(device)
        staging, target = tmp_path / "staging", tmp_path / "target"
        staging.mkdir()
        d.node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging),
            volume_capability=mount_cap(), publish_context=ctx), timeout=WAIT)
        d.node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging), target_path=str(target),
            volume_capability=mount_cap(), publish_context=ctx), timeout=WAIT)
        (target / "data").write_text("on the by-id disk")
        d.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(
            volume_id=vol.volume_id, target_path=str(target)), timeout=WAIT)
        d.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging)), timeout=WAIT)
        assert subprocess.run(["blkid", "-o", "value", "-s", "TYPE", device],
                              capture_output=True, text=True).stdout.strip() == "ext4"
        c_unpublish(d, vol.volume_id, server_name)
        got = cloud.user().block_storage.get_volume(vid)
        assert got.status == "available" and not got.attachments
        c_unpublish(d, vol.volume_id, server_name)  # idempotent
        delete(d, vol.volume_id)
    finally:
        assert d.stop() == 0, d.log()


def test_check_command(cloud: OpenStack, tmp_path: Path) -> None:
    import sys

    good = write_config(tmp_path / "good.yaml", {"os": backend_config(cloud, tmp_path)})
    done = subprocess.run([sys.executable, "-m", "csi_driver", "check", "--config", str(good)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok" in done.stdout and "os (cinder)" in done.stdout
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    config = backend_config(cloud, bad_dir)
    config["cloudsFile"] = str(clouds_file(cloud, bad_dir / "clouds.yaml", password="nope-x1"))
    bad = write_config(bad_dir / "bad.yaml", {"os": config})
    done = subprocess.run([sys.executable, "-m", "csi_driver", "check", "--config", str(bad)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "UNAUTHENTICATED" in done.stdout and "nope-x1" not in done.stdout + done.stderr


def test_bad_parameters_are_invalid_argument(cinder: Driver, cloud: OpenStack) -> None:
    for params in ({"type": "no-such-type"}, {"availability": "az9"}, {"imageFeatures": "x"}):
        name = f"badparam-{uuid.uuid4().hex[:6]}"
        code = status_of(lambda n=name, p=params: create(cinder, n, **p))
        assert code == Code.INVALID_ARGUMENT, params
        assert [v for v in our_volumes(cloud) if v.name == name] == [], "a half-made volume"


def test_error_states_show_in_condition_and_delete(cinder: Driver, cloud: OpenStack) -> None:
    vol = create(cinder, f"cond-{uuid.uuid4().hex[:6]}")
    vid = cinder_id(vol.volume_id)
    admin = cloud.admin().block_storage

    def reset(status: str) -> None:
        admin.post(f"/volumes/{vid}/action", json={"os-reset_status": {"status": status}})

    def condition() -> pb.VolumeCondition:
        got = cinder.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(
            volume_id=vol.volume_id), timeout=WAIT)
        return got.status.volume_condition

    assert not condition().abnormal
    reset("error_extending")
    assert condition().abnormal and "error_extending" in condition().message
    reset("error_deleting")
    with pytest.raises(grpc.RpcError) as err:
        delete(cinder, vol.volume_id)
    assert err.value.code() == Code.FAILED_PRECONDITION
    assert "admin" in (err.value.details() or "")
    reset("available")
    delete(cinder, vol.volume_id)


def test_ids_that_are_not_cinder_ids(cinder: Driver) -> None:
    c = cinder.controller
    for local in ("detail", "summary", "abc"):  # /volumes/detail is a listing, not a volume
        vid = f"os:{local}"
        assert status_of(lambda v=vid: delete(cinder, v)) == Code.OK
        assert status_of(lambda v=vid: c.DeleteSnapshot(pb.DeleteSnapshotRequest(
            snapshot_id=v), timeout=WAIT)) == Code.OK
        assert status_of(lambda v=vid: c.ControllerGetVolume(pb.ControllerGetVolumeRequest(
            volume_id=v), timeout=WAIT)) == Code.NOT_FOUND
        assert status_of(lambda v=vid: c.CreateSnapshot(pb.CreateSnapshotRequest(
            source_volume_id=v, name=f"s-{uuid.uuid4().hex[:6]}"), timeout=WAIT)) == Code.NOT_FOUND
        assert status_of(lambda v=vid: c_publish(cinder, v, NODE_ID)) == Code.NOT_FOUND
        assert status_of(lambda v=vid: create(cinder, f"src-{uuid.uuid4().hex[:6]}", source=Src(
            snapshot=Src.SnapshotSource(snapshot_id=v)))) == Code.NOT_FOUND
        listed = c.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id=vid), timeout=WAIT)
        assert list(listed.entries) == []


def test_partial_or_bogus_credentials(cinder: Driver, cloud: OpenStack) -> None:
    name = f"cred-{uuid.uuid4().hex[:6]}"
    full = {"auth_url": cloud.auth_url, "username": cloud.username, "password": cloud.password,
            "project_name": cloud.project, "user_domain_name": "Default",
            "project_domain_name": "Default"}
    cases = [({"username": "x"}, Code.INVALID_ARGUMENT),
             ({"auth_url": cloud.auth_url, "application_credential_id": "x"},
              Code.INVALID_ARGUMENT),
             ({"auth_url": cloud.auth_url, "token": "gAAAAbogus"}, Code.UNAUTHENTICATED),
             ({**full, "region_name": "Nowhere"}, Code.FAILED_PRECONDITION)]
    for secrets, want in cases:
        with pytest.raises(grpc.RpcError) as err:
            create(cinder, name, secrets=secrets)
        assert err.value.code() == want, (secrets, err.value.details())
        assert "internal" not in (err.value.details() or "").lower()


def test_forged_publish_context_is_refused(cinder: Driver, tmp_path: Path) -> None:
    a = create(cinder, f"forge-a-{uuid.uuid4().hex[:6]}")
    b = create(cinder, f"forge-b-{uuid.uuid4().hex[:6]}")
    staging = tmp_path / "staging"
    staging.mkdir()
    try:
        ctx = c_publish(cinder, a.volume_id, NODE_ID)
        other = c_publish(cinder, b.volume_id, NODE_ID)
        for forged in ({**ctx, "cinder/name": other["cinder/name"]},
                       {**ctx, "cinder/name": "volumes/../x"},
                       {**ctx, "cinder/name": f"volumes/volume-{cinder_id(a.volume_id)}@snap"}):
            code = status_of(lambda f=forged: cinder.node.NodeStageVolume(pb.NodeStageVolumeRequest(
                volume_id=a.volume_id, staging_target_path=str(staging),
                volume_capability=mount_cap(), publish_context=f), timeout=WAIT))
            assert code == Code.INVALID_ARGUMENT, forged
            assert not os.path.ismount(staging)
    finally:
        for v in (a, b):
            c_unpublish(cinder, v.volume_id, NODE_ID)
            delete(cinder, v.volume_id)


def test_debug_log_holds_no_secret(cloud: OpenStack, tmp_path: Path) -> None:
    """At DEBUG the driver logs every request (secrets blanked); keystoneauth and the SDK would
    log auth bodies and catalogs, so they stay at WARNING."""
    config = backend_config(cloud, tmp_path)
    del config["cloudsFile"], config["cloud"]
    d = start_driver(tmp_path, write_config(tmp_path / "c.yaml", {"os": config}),
                     "--log-level", "DEBUG")
    secrets = {"auth_url": cloud.auth_url, "username": cloud.username, "password": cloud.password,
               "project_name": cloud.project, "user_domain_name": "Default",
               "project_domain_name": "Default"}
    try:
        vol = create(d, f"debug-{uuid.uuid4().hex[:6]}", secrets=secrets)
        ctx = d.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, node_id=NODE_ID, volume_capability=mount_cap(),
            secrets=secrets), timeout=WAIT).publish_context
        assert ctx["cinder/type"] == "rbd"
        d.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
            volume_id=vol.volume_id, node_id=NODE_ID, secrets=secrets), timeout=WAIT)
        d.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id,
                                                         secrets=secrets), timeout=WAIT)
    finally:
        assert d.stop() == 0
    log = d.log()
    assert "CreateVolume" in log and "DEBUG" in log
    assert cloud.password not in log and "X-Auth-Token" not in log
