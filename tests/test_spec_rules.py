"""CSI spec rules, the same tests run against every backend and layout: hostPath (directory,
image, block), RBD on the session's real Ceph (mount, block; the node attaches with rbd-fuse) and
NFS on the session's real NFS-Ganesha (directory, image; the node runs in the User-Mode Linux
guest, whose kernel mounts NFS), Cinder (mount, block) and CephFS (ceph-fuse on this host).

Each rule is parametrized only over the layouts that have the feature it is about: the attach
rules run where the backend attaches (RBD, NFS), the hand-over of data between two nodes where
attaching holds a volume to one node (RBD, NFS image). hostPath does not attach: alone it
refuses ControllerPublish (UNIMPLEMENTED); beside an attaching backend it answers OK with an empty
publish_context.

The error codes are those of the spec's tables (container-storage-interface/spec, spec.md).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from csi_driver.csi import csi_pb2 as pb
from csi_driver.csi import csi_pb2_grpc as pb_grpc

from .ceph.cluster import CephCluster
from .ceph.filesystem import Filesystem
from .conftest import needs_root, status_of
from .harness import NODE_ID, Driver, GiB, MiB, block_cap, mount_cap, start_driver, write_config
from .nfs.fixtures import GUEST_NODE_ID, GuestNode
from .nfs.guest import Guest
from .openstack.fixtures import OpenStack
from .test_cephfs import backend_config as cephfs_config
from .test_cephfs import secrets as cephfs_secrets
from .test_cinder import backend_config as cinder_config

pytestmark = needs_root
Code = grpc.StatusCode
Mode = pb.VolumeCapability.AccessMode.Mode
RPC = pb.ControllerServiceCapability.RPC
UNREGISTERED = "never-registered-node"
RBD_NODE_2 = "spec-rbd-node-2"
WAIT = 60  # seconds any one RPC may take (an NFS mount in the guest takes about one)


@dataclass(frozen=True)
class Layout:
    id: str
    system: str  # hostpath, rbd, nfs, cinder or cephfs
    params: tuple[tuple[str, str], ...]
    block: bool = False
    size: int = 16 * MiB  # what the tests ask for (Cinder volumes come in whole GiB)

    @property
    def attaches(self) -> bool:
        """ControllerPublish records the node (and refuses a second one of a single-node
        volume)."""
        return self.system not in ("hostpath", "cephfs")

    @property
    def held_to_one_node(self) -> bool:
        """The node side too uses the volume on one node at a time, so its data moves between
        nodes by unpublish and publish."""
        return self.attaches and dict(self.params).get("volumeLayout") != "directory"


LAYOUTS = [
    Layout("hostpath-directory", "hostpath", (("layout", "directory"),)),
    Layout("hostpath-image", "hostpath", (("layout", "image"),)),
    Layout("hostpath-block", "hostpath", (), block=True),
    Layout("rbd-mount", "rbd", (("backend", "ceph"),)),
    Layout("rbd-block", "rbd", (("backend", "ceph"),), block=True),
    Layout("nfs-directory", "nfs", (("backend", "nfs"), ("volumeLayout", "directory"))),
    Layout("nfs-image", "nfs", (("backend", "nfs"), ("volumeLayout", "image"))),
    Layout("cinder-mount", "cinder", (("backend", "os"),), size=GiB),
    Layout("cinder-block", "cinder", (("backend", "os"),), block=True, size=GiB),
    Layout("cephfs", "cephfs", (("backend", "fs"),)),
]
ALL = [pytest.param(x, id=x.id) for x in LAYOUTS]
ATTACHING = [pytest.param(x, id=x.id) for x in LAYOUTS if x.attaches]
HELD = [pytest.param(x, id=x.id) for x in LAYOUTS if x.held_to_one_node]
HOSTPATH = [pytest.param(x, id=x.id) for x in LAYOUTS if x.system == "hostpath"]


# -- the two nodes of a test: a node service, and a shell on its machine ----------------------
@dataclass
class NodeSide:
    node_id: str
    stub: pb_grpc.NodeStub
    root: str  # this test's directory, beneath the node's kubelet directory
    outside: str  # an existing directory outside the kubelet directory
    shell: Callable[[str], subprocess.CompletedProcess[str]]

    def sh(self, script: str) -> str:
        done = self.shell(script)
        assert done.returncode == 0, (script, done.stdout, done.stderr)
        return done.stdout

    def mounts_at(self, path: str) -> int:
        """Mounts at `path` or beneath it, on the node's machine."""
        return int(self.sh(f"awk -v p={path} '$5 == p || index($5, p \"/\") == 1' "
                           "/proc/self/mountinfo | wc -l"))

    def dir(self, name: str) -> str:
        """A directory the CO made, as it does for a staging path."""
        path = f"{self.root}/{name}"
        self.sh(f"mkdir -p {path}")
        return path


def _host_shell(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=WAIT,
                          check=False)


def _guest_shell(guest: Guest) -> Callable[[str], subprocess.CompletedProcess[str]]:
    return lambda script: guest.run(["sh", "-c", script], timeout=WAIT)


@dataclass
class Env:
    """One layout's controller, node(s) and the arguments its requests carry."""

    layout: Layout
    controller: Driver
    backend: str  # the backend's name, the first part of its volume IDs
    secrets: dict[str, str]
    node1: NodeSide
    _second: Callable[[], NodeSide]
    # What ControllerPublish answered, by (volume ID, node ID): the node's stage gets it.
    contexts: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)

    @property
    def cap(self) -> pb.VolumeCapability:
        return block_cap() if self.layout.block else mount_cap()

    @property
    def other_kind(self) -> pb.VolumeCapability:
        return mount_cap() if self.layout.block else block_cap()

    @property
    def params(self) -> dict[str, str]:
        return dict(self.layout.params)

    def node2(self) -> NodeSide:
        return self._second()

    def unknown_id(self) -> str:
        return f"{self.backend}:pvc-never-made-{uuid.uuid4().hex[:8]}"


def rbd_backend(cluster: CephCluster, tmp: Path) -> dict[str, object]:
    """The RBD backend as tests/test_rbd.py configures it: rbd-fuse on this host, the
    cluster's csi user (so nodes register with the pool at NodeGetInfo)."""
    keyfile = tmp / "csi.key"
    keyfile.write_text(cluster.csi_key)
    return {"type": "rbd", "pool": cluster.pool, "monitors": [cluster.monitors],
            "mounter": "fuse", "nodeStateDir": str(tmp / "node"), "userID": cluster.csi_user,
            "userKeyFile": str(keyfile), "timeoutSeconds": 5}


def rbd_secrets(cluster: CephCluster) -> dict[str, str]:
    return {"userID": cluster.csi_user, "userKey": cluster.csi_key}


_names = itertools.count()


@pytest.fixture
def vname(request: pytest.FixtureRequest) -> str:
    """A volume name unique to this test, valid on every backend."""
    case = request.node.callspec.id if hasattr(request.node, "callspec") else "x"
    return f"spec-{next(_names)}-{case}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def spec_rbd(ceph_cluster: CephCluster, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Driver]:
    """An RBD backend `ceph` and, in the same driver, a hostPath backend `local`: the mixed
    configuration in which hostPath volumes must answer ControllerPublish."""
    tmp = tmp_path_factory.mktemp("spec-rbd")
    config = write_config(tmp / "c.yaml", {
        "ceph": rbd_backend(ceph_cluster, tmp),
        "local": {"type": "hostpath", "path": str(tmp / "data")}})
    d = start_driver(tmp, config)
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture(scope="session")
def spec_rbd_node2(ceph_cluster: CephCluster, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[Driver]:
    """A second RBD node (node service only, its own state directory), registered with the
    pool by its NodeGetInfo."""
    tmp = tmp_path_factory.mktemp("spec-rbd-node2")
    config = write_config(tmp / "c.yaml", {"ceph": rbd_backend(ceph_cluster, tmp)})
    d = start_driver(tmp, config, "--node-id", RBD_NODE_2,
                     "--mode", "node")
    assert d.node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=WAIT).node_id == RBD_NODE_2
    yield d
    assert d.stop() == 0, d.log()


CINDER_NODE_2 = "spec-cinder-node-2"


@pytest.fixture(scope="session")
def spec_cinder(openstack_cloud: OpenStack, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Driver]:
    """The Cinder backend `os` in `cinder` attach mode (tests/test_cinder.py's configuration):
    the controller and the first node, which connects rbd attachments with rbd-fuse."""
    tmp = tmp_path_factory.mktemp("spec-cinder")
    config = cinder_config(openstack_cloud, tmp, nodes={NODE_ID: {}, CINDER_NODE_2: {}},
                           availabilityZones=["az1"], volumeType="ceph1")
    d = start_driver(tmp, write_config(tmp / "c.yaml", {"os": config}))
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture(scope="session")
def spec_cinder_node2(openstack_cloud: OpenStack, tmp_path_factory: pytest.TempPathFactory
                      ) -> Iterator[Driver]:
    tmp = tmp_path_factory.mktemp("spec-cinder-node2")
    config = cinder_config(openstack_cloud, tmp, nodes={NODE_ID: {}, CINDER_NODE_2: {}},
                           availabilityZones=["az1"], volumeType="ceph1")
    d = start_driver(tmp, write_config(tmp / "c.yaml", {"os": config}),
                     "--node-id", CINDER_NODE_2, "--mode", "node")
    yield d
    assert d.stop() == 0, d.log()


CEPHFS_NODE_2 = "spec-cephfs-node-2"


@pytest.fixture(scope="session")
def spec_cephfs(cephfs: Filesystem, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Driver]:
    """The CephFS backend `fs` (ceph-fuse on this host): controller and first node."""
    tmp = tmp_path_factory.mktemp("spec-cephfs")
    d = start_driver(tmp, write_config(tmp / "c.yaml", {"fs": cephfs_config(cephfs, tmp)}))
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture(scope="session")
def spec_cephfs_node2(cephfs: Filesystem, tmp_path_factory: pytest.TempPathFactory
                      ) -> Iterator[Driver]:
    tmp = tmp_path_factory.mktemp("spec-cephfs-node2")
    d = start_driver(tmp, write_config(tmp / "c.yaml", {"fs": cephfs_config(cephfs, tmp)}),
                     "--node-id", CEPHFS_NODE_2, "--mode", "node")
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture(scope="session")
def outside_dir() -> Iterator[str]:
    """An existing directory that is not beneath the kubelet directory (the temporary
    directory): nothing the node is asked to do there may happen."""
    path = tempfile.mkdtemp(prefix="berth-spec-outside-", dir="/var/tmp")
    assert not os.path.realpath(path).startswith(os.path.realpath(tempfile.gettempdir()) + "/")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def env(request: pytest.FixtureRequest, tmp_path: Path, vname: str, outside_dir: str) -> Env:
    """The layout's session servers, started on first use only."""
    layout: Layout = request.param
    if layout.system == "hostpath":
        d: Driver = request.getfixturevalue("driver")
        host = NodeSide(NODE_ID, d.node, str(tmp_path), outside_dir, _host_shell)

        def no_second() -> NodeSide:
            raise AssertionError("hostPath volumes live on one node")

        return Env(layout, d, "local", {}, host, no_second)
    if layout.system == "rbd":
        d = request.getfixturevalue("spec_rbd")
        cluster: CephCluster = request.getfixturevalue("ceph_cluster")
        # Registers the node with the pool, as kubelet's NodeGetInfo does.
        assert d.node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=WAIT).node_id == NODE_ID
        host = NodeSide(NODE_ID, d.node, str(tmp_path / "n1"), outside_dir, _host_shell)

        def rbd_second() -> NodeSide:
            other: Driver = request.getfixturevalue("spec_rbd_node2")
            return NodeSide(RBD_NODE_2, other.node, str(tmp_path / "n2"), outside_dir,
                            _host_shell)

        return Env(layout, d, "ceph", rbd_secrets(cluster), host, rbd_second)
    if layout.system == "cinder":
        d = request.getfixturevalue("spec_cinder")
        host = NodeSide(NODE_ID, d.node, str(tmp_path / "n1"), outside_dir, _host_shell)

        def cinder_second() -> NodeSide:
            other: Driver = request.getfixturevalue("spec_cinder_node2")
            return NodeSide(CINDER_NODE_2, other.node, str(tmp_path / "n2"), outside_dir,
                            _host_shell)

        return Env(layout, d, "os", {}, host, cinder_second)
    if layout.system == "cephfs":
        d = request.getfixturevalue("spec_cephfs")
        fs: Filesystem = request.getfixturevalue("cephfs")
        host = NodeSide(NODE_ID, d.node, str(tmp_path / "n1"), outside_dir, _host_shell)

        def cephfs_second() -> NodeSide:
            other: Driver = request.getfixturevalue("spec_cephfs_node2")
            return NodeSide(CEPHFS_NODE_2, other.node, str(tmp_path / "n2"), outside_dir,
                            _host_shell)

        return Env(layout, d, "fs", cephfs_secrets(fs), host, cephfs_second)
    assert layout.system == "nfs"
    d = request.getfixturevalue("nfs_driver")
    guest: Guest = request.getfixturevalue("guest")
    stub: pb_grpc.NodeStub = request.getfixturevalue("node")
    assert stub.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=WAIT).node_id == GUEST_NODE_ID
    shell = _guest_shell(guest)
    outside = "/root/berth-spec-outside"  # the guest's kubelet directory is /mnt
    guest_node = NodeSide(GUEST_NODE_ID, stub, f"/mnt/{vname}/n1", outside, shell)
    guest_node.sh(f"mkdir -p {guest_node.root} {outside}")

    def nfs_second() -> NodeSide:
        other: GuestNode = request.getfixturevalue("second_node")
        got = other.node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=WAIT).node_id
        assert got == other.node_id
        side = NodeSide(other.node_id, other.node, f"/mnt/{vname}/n2", outside, shell)
        side.sh(f"mkdir -p {side.root}")
        return side

    return Env(layout, d, "nfs", {}, guest_node, nfs_second)


# -- requests -------------------------------------------------------------------------------
def create(env: Env, name: str, size: int = 0) -> pb.Volume:
    size = size or env.layout.size
    answer: pb.CreateVolumeResponse = env.controller.controller.CreateVolume(
        pb.CreateVolumeRequest(
            name=name, capacity_range=pb.CapacityRange(required_bytes=size),
            volume_capabilities=[env.cap], parameters=env.params, secrets=env.secrets),
        timeout=WAIT)
    return answer.volume


def delete(env: Env, volume_id: str) -> None:
    env.controller.controller.DeleteVolume(pb.DeleteVolumeRequest(
        volume_id=volume_id, secrets=env.secrets), timeout=WAIT)


def c_publish(env: Env, volume_id: str, node_id: str, cap: pb.VolumeCapability | None = None,
              readonly: bool = False) -> pb.ControllerPublishVolumeResponse:
    answer: pb.ControllerPublishVolumeResponse = env.controller.controller.ControllerPublishVolume(
        pb.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=node_id, volume_capability=cap or env.cap,
            readonly=readonly, secrets=env.secrets), timeout=WAIT)
    env.contexts[(volume_id, node_id)] = dict(answer.publish_context)
    return answer


def c_unpublish(env: Env, volume_id: str, node_id: str) -> None:
    env.controller.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
        volume_id=volume_id, node_id=node_id, secrets=env.secrets), timeout=WAIT)


def published_nodes(env: Env, volume_id: str) -> tuple[list[str], list[str]]:
    """The volume's published nodes as ListVolumes and as ControllerGetVolume report them."""
    c = env.controller.controller
    listed: list[str] | None = None
    token = ""
    while listed is None:
        page = c.ListVolumes(pb.ListVolumesRequest(starting_token=token), timeout=WAIT)
        for entry in page.entries:
            if entry.volume.volume_id == volume_id:
                listed = list(entry.status.published_node_ids)
        token = page.next_token
        if not token:
            break
    assert listed is not None, f"ListVolumes does not list {volume_id}"
    got = c.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=volume_id),
                                timeout=WAIT)
    return sorted(listed), sorted(got.status.published_node_ids)


def stage_req(env: Env, vol: pb.Volume, staging: str, node_id: str = ""
              ) -> pb.NodeStageVolumeRequest:
    return pb.NodeStageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=staging, volume_capability=env.cap,
        volume_context=vol.volume_context, secrets=env.secrets,
        publish_context=env.contexts.get((vol.volume_id, node_id or env.node1.node_id), {}))


def publish_req(env: Env, vol: pb.Volume, staging: str, target: str
                ) -> pb.NodePublishVolumeRequest:
    return pb.NodePublishVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=staging, target_path=target,
        volume_capability=env.cap, volume_context=vol.volume_context)


@contextlib.contextmanager
def volume(env: Env, name: str) -> Iterator[pb.Volume]:
    """A fresh volume, unpublished from every node and deleted afterwards."""
    vol = create(env, name)
    try:
        yield vol
    finally:
        if env.layout.attaches:
            c_unpublish(env, vol.volume_id, "")  # an empty node_id: from every node
        delete(env, vol.volume_id)


@contextlib.contextmanager
def staged(env: Env, side: NodeSide, vol: pb.Volume, name: str = "staging") -> Iterator[str]:
    """The volume ControllerPublished to `side` (where the backend attaches) and staged there,
    as the CO does it; unstaged and unpublished afterwards."""
    staging = side.dir(name)
    if env.layout.attaches:
        c_publish(env, vol.volume_id, side.node_id)
    try:
        side.stub.NodeStageVolume(stage_req(env, vol, staging, side.node_id), timeout=WAIT)
        try:
            yield staging
        finally:
            side.stub.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
                volume_id=vol.volume_id, staging_target_path=staging), timeout=WAIT)
            assert side.mounts_at(staging) == 0
    finally:
        if env.layout.attaches:
            c_unpublish(env, vol.volume_id, side.node_id)


@contextlib.contextmanager
def published(env: Env, side: NodeSide, vol: pb.Volume, staging: str) -> Iterator[str]:
    target = f"{side.root}/target"
    side.stub.NodePublishVolume(publish_req(env, vol, staging, target), timeout=WAIT)
    try:
        yield target
    finally:
        side.stub.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(
            volume_id=vol.volume_id, target_path=target), timeout=WAIT)


def write_data(env: Env, side: NodeSide, target: str, data: str) -> None:
    if env.layout.block:
        side.sh(f"printf %s {data} | dd of={target} conv=fsync status=none")
    else:
        side.sh(f"printf %s {data} > {target}/data && sync")


def read_data(env: Env, side: NodeSide, target: str, size: int) -> str:
    if env.layout.block:
        return side.sh(f"head -c {size} {target}")
    return side.sh(f"cat {target}/data")


# -- CreateVolume, DeleteVolume, ValidateVolumeCapabilities ----------------------------------
@pytest.mark.parametrize("env", ALL, indirect=True)
def test_create_volume_argument_errors(env: Env, vname: str) -> None:
    c = env.controller.controller
    no_name = pb.CreateVolumeRequest(volume_capabilities=[env.cap], parameters=env.params,
                                     secrets=env.secrets)
    no_caps = pb.CreateVolumeRequest(name=vname, parameters=env.params, secrets=env.secrets)
    assert status_of(lambda: c.CreateVolume(no_name, timeout=WAIT)) == Code.INVALID_ARGUMENT
    assert status_of(lambda: c.CreateVolume(no_caps, timeout=WAIT)) == Code.INVALID_ARGUMENT
    listed = c.ListVolumes(pb.ListVolumesRequest(), timeout=WAIT).entries
    assert not [e for e in listed if vname in e.volume.volume_id], "a refused create made one"


@pytest.mark.parametrize("env", ALL, indirect=True)
def test_create_volume_is_idempotent_and_refuses_another_size(env: Env, vname: str) -> None:
    with volume(env, vname) as vol:
        again = create(env, vname)
        assert again.volume_id == vol.volume_id
        assert again.capacity_bytes == vol.capacity_bytes >= env.layout.size
        assert status_of(lambda: create(env, vname, 2 * env.layout.size)) == Code.ALREADY_EXISTS
        assert create(env, vname).volume_id == vol.volume_id  # the refusal changed nothing
    # Deleted: a second DeleteVolume of the same ID is OK too.
    assert status_of(lambda: delete(env, vol.volume_id)) == Code.OK
    got = status_of(lambda: env.controller.controller.ControllerGetVolume(
        pb.ControllerGetVolumeRequest(volume_id=vol.volume_id), timeout=WAIT))
    assert got == Code.NOT_FOUND


@pytest.mark.parametrize("env", ALL, indirect=True)
def test_delete_volume_unknown_is_ok_and_empty_id_invalid(env: Env) -> None:
    for unknown in (env.unknown_id(), "not-an-id-of-this-driver", "nope:pvc-x"):
        assert status_of(lambda u=unknown: delete(env, u)) == Code.OK
    assert status_of(lambda: delete(env, "")) == Code.INVALID_ARGUMENT


@pytest.mark.parametrize("env", ALL, indirect=True)
def test_validate_volume_capabilities(env: Env, vname: str) -> None:
    c = env.controller.controller

    def validate(volume_id: str, cap: pb.VolumeCapability
                 ) -> pb.ValidateVolumeCapabilitiesResponse:
        answer: pb.ValidateVolumeCapabilitiesResponse = c.ValidateVolumeCapabilities(
            pb.ValidateVolumeCapabilitiesRequest(volume_id=volume_id, volume_capabilities=[cap],
                                                 secrets=env.secrets), timeout=WAIT)
        return answer

    assert status_of(lambda: validate(env.unknown_id(), env.cap)) == Code.NOT_FOUND
    assert status_of(lambda: validate("", env.cap)) == Code.INVALID_ARGUMENT
    with volume(env, vname) as vol:
        own = validate(vol.volume_id, env.cap)
        assert own.HasField("confirmed"), own.message
        assert list(own.confirmed.volume_capabilities) == [env.cap]
        other = validate(vol.volume_id, env.other_kind)
        assert not other.HasField("confirmed")
        assert other.message  # why not, for the CO's events
        no_caps = pb.ValidateVolumeCapabilitiesRequest(volume_id=vol.volume_id,
                                                       secrets=env.secrets)
        assert status_of(lambda: c.ValidateVolumeCapabilities(no_caps, timeout=WAIT)
                         ) == Code.INVALID_ARGUMENT


# -- ControllerPublish / ControllerUnpublish --------------------------------------------------
@pytest.mark.parametrize("env", ATTACHING, indirect=True)
def test_controller_publish_argument_errors(env: Env, vname: str) -> None:
    c = env.controller.controller
    here = env.node1.node_id

    def publish(volume_id: str = "", node_id: str = "",
                volume_capability: pb.VolumeCapability | None = None) -> Code:
        req = pb.ControllerPublishVolumeRequest(volume_id=volume_id, node_id=node_id,
                                                secrets=env.secrets)
        if volume_capability is not None:
            req.volume_capability.CopyFrom(volume_capability)
        return status_of(lambda: c.ControllerPublishVolume(req, timeout=WAIT))

    with volume(env, vname) as vol:
        vid = vol.volume_id
        assert publish(node_id=here, volume_capability=env.cap) == Code.INVALID_ARGUMENT
        assert publish(volume_id=vid, volume_capability=env.cap) == Code.INVALID_ARGUMENT
        assert publish(volume_id=vid, node_id=here) == Code.INVALID_ARGUMENT
        for unknown in (env.unknown_id(), "not-an-id-of-this-driver"):
            assert publish(volume_id=unknown, node_id=here,
                           volume_capability=env.cap) == Code.NOT_FOUND
        assert publish(volume_id=vid, node_id=UNREGISTERED,
                       volume_capability=env.cap) == Code.NOT_FOUND
        assert published_nodes(env, vid) == ([], []), "a refused publish recorded a node"
        assert status_of(lambda: c.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
            node_id=here, secrets=env.secrets), timeout=WAIT)) == Code.INVALID_ARGUMENT


@pytest.mark.parametrize("env", ATTACHING, indirect=True)
def test_controller_publish_rules(env: Env, vname: str) -> None:
    one, two = env.node1.node_id, env.node2().node_id
    with volume(env, vname) as vol:
        vid = vol.volume_id
        assert status_of(lambda: c_publish(env, vid, one)) == Code.OK
        assert status_of(lambda: c_publish(env, vid, one)) == Code.OK  # idempotent
        assert published_nodes(env, vid) == ([one], [one])
        assert status_of(lambda: c_publish(env, vid, one, readonly=True)) == Code.ALREADY_EXISTS
        other_mode = (block_cap(Mode.SINGLE_NODE_SINGLE_WRITER) if env.layout.block
                      else mount_cap(Mode.SINGLE_NODE_SINGLE_WRITER))
        assert status_of(lambda: c_publish(env, vid, one, other_mode)) == Code.ALREADY_EXISTS
        # SINGLE_NODE_WRITER: a second node waits until the first has let go.
        assert status_of(lambda: c_publish(env, vid, two)) == Code.FAILED_PRECONDITION
        assert published_nodes(env, vid) == ([one], [one])
        # Unpublishing what is not published is OK, and leaves the real attachment alone.
        assert status_of(lambda: c_unpublish(env, env.unknown_id(), one)) == Code.OK
        assert status_of(lambda: c_unpublish(env, vid, UNREGISTERED)) == Code.OK
        assert status_of(lambda: c_unpublish(env, vid, two)) == Code.OK
        assert published_nodes(env, vid) == ([one], [one])
        assert status_of(lambda: c_unpublish(env, vid, one)) == Code.OK
        assert status_of(lambda: c_unpublish(env, vid, one)) == Code.OK  # idempotent
        assert published_nodes(env, vid) == ([], [])
        assert status_of(lambda: c_publish(env, vid, two)) == Code.OK
        assert published_nodes(env, vid) == ([two], [two])


@pytest.mark.parametrize("env", HOSTPATH, indirect=True)
def test_hostpath_does_not_attach(env: Env, vname: str, request: pytest.FixtureRequest) -> None:
    """Alone, hostPath does not offer ControllerPublish; beside an attaching backend (the
    attacher then calls it for every volume of the driver) its volumes answer OK, with an empty
    publish_context, and are never listed as published."""
    def offered(d: Driver) -> bool:
        caps = d.controller.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest(),
                                                      timeout=WAIT).capabilities
        return RPC.PUBLISH_UNPUBLISH_VOLUME in {c.rpc.type for c in caps}

    with volume(env, vname) as vol:
        assert not offered(env.controller)
        assert status_of(lambda: c_publish(env, vol.volume_id, NODE_ID)) == Code.UNIMPLEMENTED
    beside_rbd = Layout(env.layout.id, "hostpath", (("backend", "local"), *env.layout.params),
                        env.layout.block)
    mixed = Env(beside_rbd, request.getfixturevalue("spec_rbd"), "local", {}, env.node1,
                env.node2)
    assert offered(mixed.controller)
    with volume(mixed, vname) as vol:
        assert vol.volume_id.startswith("local:")
        answer = c_publish(mixed, vol.volume_id, NODE_ID)
        assert dict(answer.publish_context) == {}
        # Readonly or a second node change nothing either: nothing is attached.
        assert status_of(lambda: c_publish(mixed, vol.volume_id, NODE_ID, readonly=True)
                         ) == Code.OK
        assert published_nodes(mixed, vol.volume_id) == ([], [])
        assert status_of(lambda: c_unpublish(mixed, vol.volume_id, NODE_ID)) == Code.OK


@pytest.mark.parametrize("env", HELD, indirect=True)
def test_attach_hands_the_data_from_node_to_node(env: Env, vname: str) -> None:
    one, two = env.node1, env.node2()
    data = uuid.uuid4().hex
    with volume(env, vname) as vol:
        with staged(env, one, vol) as staging, published(env, one, vol, staging) as target:
            write_data(env, one, target, data)
            assert status_of(lambda: c_publish(env, vol.volume_id, two.node_id)
                             ) == Code.FAILED_PRECONDITION
        # Unstaged and unpublished on node 1: node 2 gets it, with node 1's data.
        assert published_nodes(env, vol.volume_id) == ([], [])
        with staged(env, two, vol) as staging, published(env, two, vol, staging) as target:
            assert published_nodes(env, vol.volume_id) == ([two.node_id], [two.node_id])
            assert read_data(env, two, target, len(data)) == data


# -- Node -----------------------------------------------------------------------------------
@pytest.mark.parametrize("env", ALL, indirect=True)
def test_node_stage_twice_is_idempotent(env: Env, vname: str) -> None:
    side = env.node1
    with volume(env, vname) as vol, staged(env, side, vol) as staging:
        mounts = side.mounts_at(staging)
        assert mounts >= 1
        side.stub.NodeStageVolume(stage_req(env, vol, staging), timeout=WAIT)
        assert side.mounts_at(staging) == mounts  # nothing stacked
        with published(env, side, vol, staging) as target:
            assert side.mounts_at(target) == 1


@pytest.mark.parametrize("env", ALL, indirect=True)
def test_node_publish_before_stage_is_failed_precondition(env: Env, vname: str) -> None:
    side = env.node1
    with volume(env, vname) as vol:
        staging = side.dir("staging")
        target = f"{side.root}/target"
        if env.layout.attaches:
            c_publish(env, vol.volume_id, side.node_id)
        code = status_of(lambda: side.stub.NodePublishVolume(
            publish_req(env, vol, staging, target), timeout=WAIT))
        assert code == Code.FAILED_PRECONDITION
        assert side.mounts_at(side.root) == 0
        assert side.shell(f"test -e {target}").returncode != 0, "a refused publish made it"


@pytest.mark.parametrize("env", ALL, indirect=True)
def test_node_unpublish_unstage_of_an_id_not_ours_is_not_found(env: Env) -> None:
    side = env.node1
    staging, target = side.dir("staging"), f"{side.root}/target"
    foreign = ["not-an-id-of-this-driver", "nope:pvc-x"]
    if env.layout.system == "hostpath":  # a node that can tell its volumes apart
        foreign.append(env.unknown_id())
    for vid in foreign:
        unstage = pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging)
        unpublish = pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target)
        assert status_of(lambda r=unstage: side.stub.NodeUnstageVolume(
            r, timeout=WAIT)) == Code.NOT_FOUND, vid
        assert status_of(lambda r=unpublish: side.stub.NodeUnpublishVolume(
            r, timeout=WAIT)) == Code.NOT_FOUND, vid


@pytest.mark.parametrize("env", ALL, indirect=True)
def test_node_paths_outside_the_kubelet_dir_are_refused(env: Env, vname: str) -> None:
    side = env.node1
    outside = side.outside
    with volume(env, vname) as vol:
        staging, target = side.dir("staging"), f"{side.root}/target"
        node = side.stub
        assert status_of(lambda: node.NodeStageVolume(stage_req(env, vol, outside),
                                                      timeout=WAIT)) == Code.INVALID_ARGUMENT
        assert status_of(lambda: node.NodePublishVolume(
            publish_req(env, vol, staging, f"{outside}/target"), timeout=WAIT)
        ) == Code.INVALID_ARGUMENT
        assert status_of(lambda: node.NodePublishVolume(
            publish_req(env, vol, outside, target), timeout=WAIT)) == Code.INVALID_ARGUMENT
        assert status_of(lambda: node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=outside), timeout=WAIT)
        ) == Code.INVALID_ARGUMENT
        assert status_of(lambda: node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(
            volume_id=vol.volume_id, target_path=outside), timeout=WAIT)
        ) == Code.INVALID_ARGUMENT
        assert side.mounts_at(outside) == 0
        assert side.sh(f"ls -A {outside}") == "", "something was made outside the kubelet dir"
        assert side.shell(f"test -d {outside}").returncode == 0, "it was removed"


# -- SnapshotMetadata -------------------------------------------------------------------------
# Layouts whose snapshots tell their allocated and changed blocks; the rest answer
# FAILED_PRECONDITION, the spec's "take a full backup".
TRACKS_CHANGES = {"hostpath-image", "hostpath-block", "rbd-mount", "rbd-block"}


def snapshot_ready(env: Env, name: str, volume_id: str) -> str:
    request = pb.CreateSnapshotRequest(name=name, source_volume_id=volume_id,
                                       secrets=env.secrets)
    deadline = time.monotonic() + WAIT
    while True:
        snap = env.controller.controller.CreateSnapshot(request, timeout=WAIT).snapshot
        if snap.ready_to_use:
            return snap.snapshot_id
        assert time.monotonic() < deadline, "snapshot never became ready"
        time.sleep(0.1)


@pytest.mark.parametrize("env", ALL, indirect=True)
def test_snapshot_metadata_rules(env: Env, vname: str) -> None:
    m = env.controller.metadata

    def allocated(snap: str, start: int = 0) -> list[pb.GetMetadataAllocatedResponse]:
        return list(m.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(
            snapshot_id=snap, starting_offset=start, secrets=env.secrets), timeout=WAIT))

    def delta(base: str, target: str, start: int = 0) -> list[pb.GetMetadataDeltaResponse]:
        return list(m.GetMetadataDelta(pb.GetMetadataDeltaRequest(
            base_snapshot_id=base, target_snapshot_id=target, starting_offset=start,
            secrets=env.secrets), timeout=WAIT))

    unknown = f"{env.backend}:snap-never-made-{uuid.uuid4().hex[:8]}"
    assert status_of(lambda: allocated(unknown)) == Code.NOT_FOUND
    assert status_of(lambda: allocated("")) == Code.INVALID_ARGUMENT
    with volume(env, vname) as vol:
        snap = snapshot_ready(env, f"{vname}-s", vol.volume_id)
        try:
            assert status_of(lambda: delta(snap, unknown)) == Code.NOT_FOUND
            if env.layout.id not in TRACKS_CHANGES:
                assert status_of(lambda: allocated(snap)) == Code.FAILED_PRECONDITION
                assert status_of(lambda: delta(snap, snap)) == Code.FAILED_PRECONDITION
                return
            answers = allocated(snap)
            assert answers and {a.volume_capacity_bytes for a in answers} == {
                vol.capacity_bytes}
            same = delta(snap, snap)
            assert len(same) == 1 and not same[0].block_metadata
            assert status_of(lambda: allocated(snap, -1)) == Code.OUT_OF_RANGE
            assert status_of(lambda: allocated(snap, vol.capacity_bytes + 1)
                             ) == Code.OUT_OF_RANGE
        finally:
            env.controller.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(
                snapshot_id=snap, secrets=env.secrets), timeout=WAIT)
