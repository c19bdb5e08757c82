"""The session's real NFS server and a driver that reaches it, as pytest fixtures.

Import into a conftest.py. The server starts on first use only; missing packages fail the test
(never skip it): CI installs them with scripts/install-nfs.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver.csi import csi_pb2 as pb
from csi_driver.csi import csi_pb2_grpc as pb_grpc

from ..harness import Driver, start_driver, write_config
from .guest import GUEST_ADDRESS, Guest, _netns, guest_python, missing, start_guest
from .server import NfsServer, missing_packages, start_server


@pytest.fixture(scope="session")
def nfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NfsServer]:
    missing = missing_packages()
    if missing:
        pytest.fail(f"NFS test packages missing: {' '.join(missing)}; run scripts/install-nfs",
                    pytrace=False)
    server = start_server(tmp_path_factory.mktemp("nfs"))
    try:
        yield server
    finally:
        server.stop()


def nfs_backend(nfs: NfsServer, **extra: Any) -> dict[str, Any]:
    return {"type": "nfs", "server": nfs.address, "share": "/export",
            "copyWaitSeconds": 2, "timeoutSeconds": 5, **extra}


def start_nfs_driver(server: NfsServer, tmp: Path, backends: dict[str, Any] | None = None,
                     *args: str, env: dict[str, str] | None = None) -> Driver:
    """A driver (controller and node, unless `args` say otherwise) running inside the
    server's network namespace."""
    config = write_config(tmp / "config.yaml", backends or {"nfs": nfs_backend(server)})
    return start_driver(tmp, config, *args, prefix=server.in_netns([]), env=env)


@pytest.fixture(scope="session")
def nfs_driver(nfs_server: NfsServer, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Driver]:
    tmp = tmp_path_factory.mktemp("nfs-driver")
    running = start_nfs_driver(nfs_server, tmp, {
        "nfs": nfs_backend(nfs_server),
        "tree": nfs_backend(nfs_server, subDir="${pvc.metadata.namespace}/${pvc.metadata.name}",
                            onDelete="archive"),
    })
    yield running
    assert running.stop() == 0, running.log()
    shutil.rmtree(nfs_server.export_dir / ".berth" / "trash", ignore_errors=True)


GUEST_NODE_ID = "uml-node"


@pytest.fixture(scope="session")
def guest(nfs_server: NfsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    """The session's User-Mode Linux guest (one per run: it boots in ~10 s), its node service
    registered as `uml-node` with the session's NFS server."""
    lacking = missing()
    if lacking:
        pytest.fail(f"UML packages missing: {' '.join(lacking)}; run scripts/install-nfs",
                    pytrace=False)
    work = tmp_path_factory.mktemp("uml")
    config = write_config(work / "node.yaml", {"nfs": {
        "type": "nfs", "server": nfs_server.address, "share": "/export", "timeoutSeconds": 5}})
    running = start_guest(work, nfs_server.netns,
                          ["--node-id", GUEST_NODE_ID, "--config", str(config), "--mode", "node"])
    yield running
    running.stop()


@pytest.fixture(scope="session")
def node(guest: Guest) -> Iterator[pb_grpc.NodeStub]:
    with grpc.insecure_channel(f"unix://{guest.driver_socket}") as channel:
        yield pb_grpc.NodeStub(channel)  # type: ignore[no-untyped-call]


@dataclass
class GuestNode:
    """A second node service in the guest: another driver process, with its own node ID and
    node state directory, reached through its own relay."""

    node_id: str
    node: pb_grpc.NodeStub
    channel: grpc.Channel
    pid: int  # the driver's, in the guest


SECOND_PORT = 7003


def start_second_node(guest: Guest, nfs: NfsServer, node_id: str) -> GuestNode:
    state = f"/var/lib/berth/{node_id}"
    config = (f"backends:\n  nfs:\n    type: nfs\n    server: {nfs.address}\n"
              f"    share: /export\n    timeoutSeconds: 5\n    nodeStateDir: {state}\n")
    conf = f"/run/{node_id}.yaml"
    python = " ".join(guest_python())
    script = (f"mkdir -p {state} && printf '%s' '{config}' > {conf} && "
              f"setsid {python} -m csi_driver --node-id {node_id} --config {conf} "
              f"--mode node --endpoint tcp://0.0.0.0:{SECOND_PORT} "
              f"</dev/null >/run/out/{node_id}.log 2>&1 & echo $!")
    done = guest.run(["sh", "-c", script])
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout)
    sock = guest.work / f"{node_id}.sock"
    guest.relays.append(subprocess.Popen(  # guest.stop() ends it with the others
        _netns(guest.netns, ["socat", f"UNIX-LISTEN:{sock},fork,unlink-early",
                             f"TCP:{GUEST_ADDRESS}:{SECOND_PORT}"]),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True))
    options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 300)]
    channel = grpc.insecure_channel(f"unix://{sock}", options)
    identity = pb_grpc.IdentityStub(channel)  # type: ignore[no-untyped-call]
    deadline = time.monotonic() + 30
    while True:
        try:
            identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=2)
            break
        except grpc.RpcError:
            if time.monotonic() > deadline:
                log = guest.run(["cat", f"/run/out/{node_id}.log"]).stdout
                raise RuntimeError(f"second guest node did not answer:\n{log}") from None
            time.sleep(0.1)
    stub = pb_grpc.NodeStub(channel)  # type: ignore[no-untyped-call]
    return GuestNode(node_id, stub, channel, pid)


@pytest.fixture(scope="session")
def second_node(guest: Guest, nfs_server: NfsServer) -> Iterator[GuestNode]:
    """A second node in the session's guest (`uml-node-2`), for rules about two nodes."""
    running = start_second_node(guest, nfs_server, "uml-node-2")
    yield running
    running.channel.close()
    guest.run(["kill", str(running.pid)])
