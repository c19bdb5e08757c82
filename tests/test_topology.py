"""Topology segments from the config (an admin pins a backend to a zone) on hostPath, whose
volumes also carry the node, and the node's own segments from --topology."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from csi_driver.csi import csi_pb2 as pb

from .conftest import status_of
from .harness import NODE_ID, TOPOLOGY_KEY, Driver, MiB, mount_cap, start_driver, write_config
from .test_server import run_cli

ZONE = "topology.kubernetes.io/zone"


@pytest.fixture(scope="module")
def zoned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    tmp = tmp_path_factory.mktemp("zoned")
    config = write_config(tmp / "c.yaml", {
        "local": {"type": "hostpath", "path": str(tmp / "d"), "topology": {ZONE: "zone-a"}}})
    d = start_driver(tmp, config, "--topology", f"{ZONE}=zone-a")
    yield d
    assert d.stop() == 0


def _create(d: Driver, name: str, *requisite: dict[str, str]) -> pb.CreateVolumeResponse:
    return d.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name, capacity_range=pb.CapacityRange(required_bytes=MiB),
        volume_capabilities=[mount_cap()],
        accessibility_requirements=pb.TopologyRequirement(
            requisite=[pb.Topology(segments=t) for t in requisite])))


def test_volume_carries_zone_and_node(zoned: Driver, name: str) -> None:
    here = {ZONE: "zone-a", TOPOLOGY_KEY: NODE_ID}
    vol = _create(zoned, name, {ZONE: "zone-b", TOPOLOGY_KEY: NODE_ID}, here).volume
    try:
        assert [dict(t.segments) for t in vol.accessible_topology] == [here]
        listed = zoned.controller.ControllerGetVolume(
            pb.ControllerGetVolumeRequest(volume_id=vol.volume_id)).volume
        assert [dict(t.segments) for t in listed.accessible_topology] == [here]
    finally:
        zoned.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))


@pytest.mark.parametrize("elsewhere", [
    {ZONE: "zone-b", TOPOLOGY_KEY: NODE_ID},  # this node's name, another zone
    {ZONE: "zone-a", TOPOLOGY_KEY: "other-node"},
    {TOPOLOGY_KEY: NODE_ID},  # a node that reports no zone cannot reach a zoned volume
], ids=["zone", "node", "no-zone"])
def test_requisite_elsewhere_is_resource_exhausted(zoned: Driver, name: str,
                                                   elsewhere: dict[str, str]) -> None:
    assert status_of(lambda: _create(zoned, name, elsewhere)) == \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    got = zoned.controller.GetCapacity(pb.GetCapacityRequest(
        accessible_topology=pb.Topology(segments=elsewhere)))
    assert got.available_capacity == 0


def test_node_reports_its_zone(zoned: Driver) -> None:
    info = zoned.node.NodeGetInfo(pb.NodeGetInfoRequest())
    assert dict(info.accessible_topology.segments) == {ZONE: "zone-a", TOPOLOGY_KEY: NODE_ID}
    assert zoned.controller.GetCapacity(pb.GetCapacityRequest(
        accessible_topology=info.accessible_topology)).available_capacity > 0


@pytest.mark.parametrize("bad", ["zone", "=a", "k=", "k=a b", f"k={'x' * 64}"])
def test_bad_topology_flag_is_refused(bad: str) -> None:
    result = run_cli("--topology", bad, "--endpoint", "unix:///nonexistent/x.sock")
    assert result.returncode == 2
    assert "--topology" in result.stderr and "Traceback" not in result.stderr
