"""/metrics: the RPC series the sidecars' dashboards know, backend calls, and nothing private."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from csi_driver.csi import csi_pb2 as pb

from .conftest import status_of
from .harness import DRIVER_NAME, Driver, MiB, mount_cap, start_driver, write_config
from .nfs.fixtures import start_nfs_driver
from .nfs.server import NfsServer
from .test_server import run_cli

SECRET = "hunter2-do-not-show"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Driver, int]]:
    tmp = tmp_path_factory.mktemp("metrics")
    config = write_config(tmp / "c.yaml", {"local": {"type": "hostpath", "path": str(tmp / "d"),
                                                     "capacity": "64Mi"}})
    port = free_port()
    d = start_driver(tmp, config, "--metrics-address", f"127.0.0.1:{port}")
    yield d, port
    assert d.stop() == 0


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return str(answer.read().decode())


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(dict(s.labels), s.value) for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name]


def value(text: str, name: str, **labels: str) -> float:
    found = [v for got, v in samples(text, name) if all(got.get(k) == w for k, w in labels.items())]
    return sum(found)


def test_rpcs_backend_calls_and_no_private_labels(metered: tuple[Driver, int],
                                                  name: str) -> None:
    d, port = metered
    before = scrape(port)
    create = "/csi.v1.Controller/CreateVolume"
    vol_name = f"{name}-private-volume-name"

    def make(size: int) -> pb.CreateVolumeResponse:
        return d.controller.CreateVolume(pb.CreateVolumeRequest(
            name=vol_name, capacity_range=pb.CapacityRange(required_bytes=size),
            volume_capabilities=[mount_cap()], secrets={"password": SECRET}))

    vol = make(MiB).volume
    make(MiB)  # the same again
    assert status_of(lambda: d.controller.CreateVolume(pb.CreateVolumeRequest())) == \
        grpc.StatusCode.INVALID_ARGUMENT
    # More than the backend's capacity: the backend itself refuses.
    assert status_of(lambda: d.controller.CreateVolume(pb.CreateVolumeRequest(
        name=f"{name}-big", capacity_range=pb.CapacityRange(required_bytes=128 * MiB),
        volume_capabilities=[mount_cap()]))) == grpc.StatusCode.RESOURCE_EXHAUSTED
    d.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    text = scrape(port)

    rpc = "csi_plugin_operations_seconds_count"
    for code, calls in (("OK", 2), ("InvalidArgument", 1), ("ResourceExhausted", 1)):
        got = value(text, rpc, driver_name=DRIVER_NAME, method_name=create,
                    grpc_status_code=code) - value(before, rpc, method_name=create,
                                                   grpc_status_code=code)
        assert got == calls, (code, got)
    assert {frozenset(labels) for labels, _ in samples(text, rpc)} == {
        frozenset({"driver_name", "method_name", "grpc_status_code"})}
    buckets = [labels["le"] for labels, _ in samples(text, "csi_plugin_operations_seconds_bucket")
               if labels["method_name"] == create and labels["grpc_status_code"] == "OK"]
    assert "0.1" in buckets and "600.0" in buckets and "+Inf" in buckets

    backend = "berth_backend_operation_seconds_count"
    assert value(text, backend, backend="local", backend_type="hostpath",
                 operation="create_volume") - value(before, backend,
                                                    operation="create_volume") == 3
    assert value(text, backend, operation="delete_volume") >= 1
    assert value(text, "berth_backend_operation_errors_total", backend="local",
                 operation="create_volume", grpc_status_code="ResourceExhausted") >= 1
    # Nothing is in flight once the calls have returned.
    assert all(v == 0 for _, v in samples(text, "berth_operations_in_flight"))
    assert samples(text, "berth_operations_in_flight")
    # No secret, volume name or ID in any series.
    for private in (SECRET, vol_name, vol.volume_id, name):
        assert private not in text


@pytest.mark.parametrize("address, words", [
    ("nonsense", "host:port"), ("127.0.0.1:0", "host:port"), ("127.0.0.1:99999", "host:port")])
def test_bad_metrics_address(address: str, words: str) -> None:
    result = run_cli("--metrics-address", address, "--endpoint", "unix:///nonexistent/x.sock")
    assert result.returncode == 2
    assert words in result.stderr and "Traceback" not in result.stderr


def test_metrics_port_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("--metrics-address", f"127.0.0.1:{port}", "--data-dir",
                         str(tmp_path), "--endpoint", f"unix://{tmp_path}/csi.sock")
    assert result.returncode == 2
    assert "--metrics-address" in result.stderr and "Traceback" not in result.stderr


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("csi-driver ") and result.stdout.split()[1][0].isdigit()


def test_nfs_background_queues(nfs_server: NfsServer, tmp_path: Path) -> None:
    """A backend's work beside the RPCs: copies running and trash waiting (the driver runs in
    the NFS server's network namespace, so the scrape does too)."""
    port = free_port()
    d = start_nfs_driver(nfs_server, tmp_path, None, "--metrics-address", f"127.0.0.1:{port}")
    try:
        scraped = subprocess.run(nfs_server.in_netns([
            sys.executable, "-c", "import urllib.request, sys; sys.stdout.write(urllib.request."
            f"urlopen('http://127.0.0.1:{port}/metrics', timeout=10).read().decode())"]),
            capture_output=True, text=True, timeout=30, check=True).stdout
        queues = {labels["queue"]: v for labels, v in samples(scraped, "berth_background_queue")
                  if labels["backend"] == "nfs"}
        assert set(queues) == {"copies", "trash"}
        assert queues["copies"] == 0 and queues["trash"] >= 0
        assert value(scraped, "berth_backend_operation_seconds_count", backend="nfs",
                     backend_type="nfs", operation="start") == 1
    finally:
        assert d.stop() == 0, d.log()
