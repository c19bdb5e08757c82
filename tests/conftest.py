"""Fixtures: the real driver over a real unix socket, in a private mount namespace."""

from __future__ import annotations

import ctypes
import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver.csi import csi_pb2 as pb

from .ceph.fixtures import ceph_cluster, cephfs  # noqa: F401 - the session's Ceph, started on use
from .harness import Driver, start_driver, write_config
from .nfs.fixtures import guest, nfs_driver, nfs_server, node, second_node  # noqa: F401 - started on first use
from .openstack.compute import nova_cloud  # noqa: F401 - started on first use
from .openstack.fixtures import openstack_cloud  # noqa: F401 - started on first use

CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE = 0x4000, 0x40000


def pytest_configure(config: pytest.Config) -> None:
    """The drivers the tests start take the temporary directory, where every test's staging and
    target paths live, as their kubelet directory.

    As root, move the whole test session (and the drivers it starts) into a private mount
    namespace, so no mount made by a test can leak onto the machine, even after a crash."""
    os.environ.setdefault("BERTH_KUBELET_DIR", os.path.realpath(tempfile.gettempdir()))
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) failed")
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "making / private failed")


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


@pytest.fixture(scope="session")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    """One driver for the session: a hostPath backend named `local`."""
    tmp = tmp_path_factory.mktemp("driver")
    config = write_config(tmp / "config.yaml",
                          {"local": {"type": "hostpath", "path": str(tmp / "data")}})
    running = start_driver(tmp, config)
    yield running
    assert running.stop() == 0, running.log()


_names = itertools.count()


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """A volume name unique to this test."""
    return f"pvc-{request.node.name[:40]}-{next(_names)}".replace("[", "-").replace("]", "")


@pytest.fixture
def volume(driver: Driver, name: str) -> Iterator[pb.Volume]:
    """A fresh 10 MiB mount volume, deleted afterwards."""
    from .harness import MiB, mount_cap

    vol = driver.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name, capacity_range=pb.CapacityRange(required_bytes=10 * MiB),
        volume_capabilities=[mount_cap()])).volume
    yield vol
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))


@pytest.fixture
def paths(tmp_path: Path) -> tuple[str, str]:
    """A staging directory (created, as the CO does) and a target path (left to the driver)."""
    staging = tmp_path / "staging"
    staging.mkdir()
    return str(staging), str(tmp_path / "target")


def status_of(call: object) -> grpc.StatusCode:
    """The gRPC status an RPC call ends with (OK when it returns)."""
    assert callable(call)
    try:
        call()
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK
