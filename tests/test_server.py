"""The process: endpoints, socket handling, modes, logging, signals, config errors."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from csi_driver.csi import csi_pb2 as pb
from csi_driver.csi import csi_pb2_grpc as pb_grpc

from .conftest import status_of
from .harness import Driver, mount_cap, start_driver, write_config

# tgkill(2), which signals one thread of another process, by architecture.
SYS_TGKILL = {"x86_64": 234, "aarch64": 131}[os.uname().machine]


def hostpath_config(tmp: Path) -> Path:
    return write_config(tmp / "c.yaml", {"local": {"type": "hostpath", "path": str(tmp / "d")}})


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "csi_driver", *args], capture_output=True,
                          text=True, timeout=30)


def test_socket_mode_and_removal_on_sigterm(tmp_path: Path) -> None:
    d = start_driver(tmp_path, hostpath_config(tmp_path))
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o660
    assert d.stop(signal.SIGTERM) == 0
    assert not d.socket.exists()
    assert "received SIGTERM" in d.log()


def test_sigint_also_stops_cleanly(tmp_path: Path) -> None:
    d = start_driver(tmp_path, hostpath_config(tmp_path))
    assert d.stop(signal.SIGINT) == 0
    assert not d.socket.exists()


def test_sigterm_delivered_to_a_grpc_thread_still_stops(tmp_path: Path) -> None:
    # The kernel may give a process-directed signal to any thread; a CI run once hung at
    # shutdown because the main thread slept in a wait the handler never got to run after.
    d = start_driver(tmp_path, hostpath_config(tmp_path))
    pid = d.proc.pid
    others = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
    assert others, "gRPC runs its own threads"
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(SYS_TGKILL, pid, others[0], signal.SIGTERM) == 0
    assert d.proc.wait(5) == 0
    assert "received SIGTERM" in d.log() and not d.socket.exists()


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "csi.sock"))
    stale.close()  # the file stays, nobody listens: what a crash leaves behind
    d = start_driver(tmp_path, hostpath_config(tmp_path))
    assert d.stop() == 0


def test_refuses_to_remove_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "csi.sock").write_text("precious")
    result = run_cli("--endpoint", f"unix://{tmp_path}/csi.sock", "--config",
                     str(hostpath_config(tmp_path)))
    assert result.returncode == 2
    assert "not a socket" in result.stderr
    assert (tmp_path / "csi.sock").read_text() == "precious"


def test_refuses_a_socket_another_driver_serves(driver: Driver) -> None:
    result = run_cli("--endpoint", f"unix://{driver.socket}")
    assert result.returncode == 2
    assert "another process" in result.stderr
    driver.identity.Probe(pb.ProbeRequest())  # the first one is unharmed


@pytest.mark.parametrize("node_id", ["", "-starts-with-dash", "n" * 64, "has space"])
def test_bad_node_id(node_id: str) -> None:
    result = run_cli("--node-id", node_id)
    assert result.returncode == 2
    assert "--node-id" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("endpoint", ["/tmp/x.sock", "unix://relative.sock", "http://x"])
def test_bad_endpoint(endpoint: str) -> None:
    result = run_cli("--endpoint", endpoint)
    assert result.returncode == 2
    assert "endpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_tcp_endpoint(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "csi_driver", "--endpoint",
                             f"tcp://127.0.0.1:{port}", "--data-dir", str(tmp_path / "d")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=15)
            info = pb_grpc.IdentityStub(ch).GetPluginInfo(pb.GetPluginInfoRequest())
            assert info.name == "berth.csi.dev"
    finally:
        proc.terminate()
        assert proc.wait(20) == 0


def test_embedded_default_serves_hostpath(tmp_path: Path) -> None:
    d = start_driver(tmp_path, None, data_dir=tmp_path / "default-data")
    try:
        vol = d.controller.CreateVolume(pb.CreateVolumeRequest(
            name="first", volume_capabilities=[mount_cap()])).volume
        assert vol.volume_id.startswith("local:")
        assert (tmp_path / "default-data" / "volumes").is_dir()
    finally:
        assert d.stop() == 0


def test_one_log_line_per_rpc(tmp_path: Path) -> None:
    d = start_driver(tmp_path, hostpath_config(tmp_path))
    try:
        before = d.log().count("rpc=")
        d.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id="local:x"))
        status_of(lambda: d.controller.DeleteVolume(pb.DeleteVolumeRequest()))
    finally:
        assert d.stop() == 0
    lines = [ln for ln in d.log().splitlines() if "rpc=/csi.v1.Controller/DeleteVolume" in ln]
    assert len(lines) == 2 and d.log().count("rpc=") == before + 2
    assert re.search(r"id=\S+ status=OK duration_ms=\d+\.\d+", lines[0])
    assert "status=INVALID_ARGUMENT" in lines[1] and "volume_id is required" in lines[1]


def test_secrets_never_logged_even_at_debug(tmp_path: Path) -> None:
    d = start_driver(tmp_path, hostpath_config(tmp_path), "--log-level", "DEBUG")
    secret = "s3cr3t-Val-9f2"
    try:
        status_of(lambda: d.node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id="local:nope", staging_target_path=str(tmp_path),
            volume_capability=mount_cap(), secrets={"userKey": secret})))
        status_of(lambda: d.controller.CreateVolume(pb.CreateVolumeRequest(
            name="x", volume_capabilities=[mount_cap()], secrets={"password": secret})))
    finally:
        assert d.stop() == 0
    log = d.log()
    assert secret not in log
    assert "userKey" in log and "***" in log  # the request was logged, blanked


def test_controller_mode_serves_no_node_service(tmp_path: Path) -> None:
    d = start_driver(tmp_path, hostpath_config(tmp_path), "--mode", "controller")
    try:
        code = status_of(lambda: d.node.NodeGetInfo(pb.NodeGetInfoRequest()))
        assert code == grpc.StatusCode.UNIMPLEMENTED
        d.controller.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest())
    finally:
        assert d.stop() == 0


def test_node_mode_serves_no_controller(tmp_path: Path) -> None:
    d = start_driver(tmp_path, hostpath_config(tmp_path), "--mode", "node")
    try:
        code = status_of(lambda: d.controller.ControllerGetCapabilities(
            pb.ControllerGetCapabilitiesRequest()))
        assert code == grpc.StatusCode.UNIMPLEMENTED
        caps = d.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
        assert pb.PluginCapability.Service.CONTROLLER_SERVICE not in {c.service.type for c in caps}
        assert d.node.NodeGetInfo(pb.NodeGetInfoRequest()).node_id
    finally:
        assert d.stop() == 0


def test_sigterm_under_load_leaves_no_half_made_volume(tmp_path: Path) -> None:
    d = start_driver(tmp_path, hostpath_config(tmp_path))
    # A channel of our own: d.stop() closes the harness's channel before signalling.
    channel = grpc.insecure_channel(f"unix://{d.socket}")
    controller = pb_grpc.ControllerStub(channel)
    results: list[grpc.StatusCode] = []

    def hammer(i: int) -> None:
        for j in range(30):
            req = pb.CreateVolumeRequest(name=f"load-{i}-{j}", volume_capabilities=[mount_cap()])
            results.append(status_of(
                lambda r=req: controller.CreateVolume(r, timeout=10)))  # type: ignore[misc]

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    while len(results) < 10:
        time.sleep(0.01)
    assert d.stop() == 0
    for t in threads:
        t.join()
    channel.close()
    ok = results.count(grpc.StatusCode.OK)
    assert ok >= 10
    # A call caught by the shutdown may also time out on the client (a connection the stopping
    # server never answers); what matters is that no volume is left half-made.
    assert set(results) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE,
                            grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}
    volumes = [p for p in (tmp_path / "d" / "volumes").iterdir()]
    assert len(volumes) >= ok  # every answered create is complete on disk
    assert all(os.getxattr(p, "trusted.berth") for p in volumes)  # each one's record is there
    assert list((tmp_path / "d" / ".tmp").iterdir()) == []


def test_every_log_line_of_an_rpc_names_its_request(tmp_path: Path, name: str) -> None:
    """The request id is on each line an RPC causes (the [id] field), the slow-call warning
    included; lines outside any RPC show [-]."""
    d = start_driver(tmp_path, hostpath_config(tmp_path), "--slow-rpc-seconds", "0",
                     "--log-level", "DEBUG")
    try:
        d.controller.CreateVolume(pb.CreateVolumeRequest(
            name=name, volume_capabilities=[mount_cap()]))
    finally:
        assert d.stop() == 0
    lines = d.log().splitlines()
    done = [ln for ln in lines if "rpc=/csi.v1.Controller/CreateVolume" in ln and "status=" in ln]
    assert len(done) == 1, lines
    rid = re.search(r" id=(\S+) ", done[0]).group(1)  # type: ignore[union-attr]
    mine = [ln for ln in lines if f"[{rid}]" in ln]
    assert any("request={" in ln for ln in mine)  # the DEBUG line of the request
    assert any("slow rpc=/csi.v1.Controller/CreateVolume" in ln for ln in mine)
    assert done[0] in mine
    assert any("[-]" in ln for ln in lines)  # start-up lines belong to no request


def test_threads_started_for_a_request_keep_its_id() -> None:
    from csi_driver import requestid

    seen: list[str] = []
    token = requestid.current.set("abc-1")
    try:
        t = threading.Thread(target=requestid.in_context(lambda: seen.append(
            requestid.current.get())))
        plain = threading.Thread(target=lambda: seen.append(requestid.current.get()))
        t.start(), plain.start()
        t.join(), plain.join()
    finally:
        requestid.current.reset(token)
    assert sorted(seen) == ["-", "abc-1"]


def test_first_start_makes_the_store_with_its_own_modes(tmp_path: Path) -> None:
    """The socket's umask (0117) is the process's: backends starting while it was set made
    hostPath's directories 0600, which a non-root driver then could not enter."""
    for attempt in range(3):
        data, run = tmp_path / f"fresh-{attempt}", tmp_path / f"run-{attempt}"
        run.mkdir()
        d = start_driver(run, None, data_dir=data)
        try:
            d.identity.Probe(pb.ProbeRequest(), timeout=10)
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in data.rglob("*")
                     if p.is_dir()}
            assert modes and set(modes.values()) == {0o711}, modes
        finally:
            assert d.stop() == 0
