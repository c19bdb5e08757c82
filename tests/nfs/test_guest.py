"""Smoke test of the User-Mode Linux guest: its kernel NFS client mounts the test server."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver.csi import csi_pb2 as pb

from .guest import Guest, start_guest
from .server import NfsServer, start_server


@pytest.fixture(scope="module")
def nfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NfsServer]:
    # A namespace of its own: start_server would replace one of the same name (the default).
    server = start_server(tmp_path_factory.mktemp("nfs"), f"berth-nfs-guest-{os.getpid()}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory, nfs_server: NfsServer) -> Iterator[Guest]:
    running = start_guest(tmp_path_factory.mktemp("guest"), nfs_server.netns,
                          ["--node-id", "uml-node", "--mode", "node"])
    yield running
    running.stop()


def test_guest_mounts_nfs_v41(guest: Guest, nfs_server: NfsServer) -> None:
    name = f"from-guest-{uuid.uuid4().hex[:8]}"
    where = f"/mnt/{name}"
    assert guest.run(["mkdir", "-p", where]).returncode == 0
    mount = guest.run(["mount", "-t", "nfs", "-o", "vers=4.1,hard",
                       f"{nfs_server.address}:/export", where])
    assert mount.returncode == 0, mount.stderr
    try:
        wrote = guest.run(["sh", "-c", f"echo hello > {where}/{name}"])
        assert wrote.returncode == 0, wrote.stderr
        assert (nfs_server.export_dir / name).read_text() == "hello\n"
        (nfs_server.export_dir / f"{name}-host").write_text("back")
        assert guest.run(["cat", f"{where}/{name}-host"]).stdout == "back"
    finally:
        assert guest.run(["umount", where]).returncode == 0


def test_driver_in_guest_answers(guest: Guest) -> None:
    import grpc

    from csi_driver.csi import csi_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"unix://{guest.driver_socket}") as channel:
        identity = pb_grpc.IdentityStub(channel)  # type: ignore[no-untyped-call]
        info = identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=10)
    assert info.name
    assert "uml-node" in guest.driver_log()


def test_guest_cannot_write_the_host(guest: Guest, tmp_path: Path) -> None:
    """Writes in the guest land in its memory (an overlay), never on the host's disk."""
    target = tmp_path / "written-in-guest"
    assert guest.run(["sh", "-c", f"echo x > {target}"]).returncode == 0
    assert guest.run(["cat", str(target)]).stdout == "x\n"
    assert not target.exists()
