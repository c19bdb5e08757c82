"""Topology segments from the config and the node's limit, on a backend that attaches (NFS)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from csi_driver.csi import csi_pb2 as pb

from ..conftest import status_of
from ..harness import TOPOLOGY_KEY, MiB, mount_cap
from .fixtures import nfs_backend, start_nfs_driver
from .server import NfsServer

ZONE = "topology.kubernetes.io/zone"
Mode = pb.VolumeCapability.AccessMode.Mode


def test_zone_from_config_and_volumes_per_node(nfs_server: NfsServer, tmp_path: Path,
                                               name: str) -> None:
    """An admin pins the backend to zone-a: volumes say so, a request for zone-b only is
    RESOURCE_EXHAUSTED (and has no capacity there), the node reports its own zone for that key;
    maxVolumesPerNode: 1 is the node's limit and ControllerPublish holds to it."""
    driver = start_nfs_driver(nfs_server, tmp_path, {
        "nfs": nfs_backend(nfs_server, topology={ZONE: "zone-a"}, maxVolumesPerNode=1)},
        "--topology", f"{ZONE}=zone-a", "--topology", "rack=r1")
    made: list[str] = []
    try:
        caps = driver.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest())
        assert pb.PluginCapability.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS in {
            c.service.type for c in caps.capabilities}
        info = driver.node.NodeGetInfo(pb.NodeGetInfoRequest())
        # rack is no backend's key: not reported.
        assert dict(info.accessible_topology.segments) == {ZONE: "zone-a",
                                                           TOPOLOGY_KEY: info.node_id}
        assert info.max_volumes_per_node == 1
        node = {ZONE: "zone-a", TOPOLOGY_KEY: info.node_id}

        def create(vol_name: str, *zones: str) -> pb.CreateVolumeResponse:
            return driver.controller.CreateVolume(pb.CreateVolumeRequest(
                name=vol_name, capacity_range=pb.CapacityRange(required_bytes=MiB),
                volume_capabilities=[mount_cap(Mode.SINGLE_NODE_WRITER)],
                parameters={"subDir": vol_name},
                accessibility_requirements=pb.TopologyRequirement(
                    requisite=[pb.Topology(segments={**node, ZONE: z}) for z in zones])))

        try:
            create(f"{name}-b", "zone-b", "zone-c")
            raise AssertionError("a volume of zone-a was made for zone-b")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "topology.kubernetes.io/zone=zone-a" in (exc.details() or "")
        for zone, wanted in (("zone-b", 0), ("zone-a", 1)):
            got = driver.controller.GetCapacity(pb.GetCapacityRequest(
                accessible_topology=pb.Topology(segments={**node, ZONE: zone})))
            assert (got.available_capacity > 0) == bool(wanted), zone
        vols = []
        for i in range(2):
            vol = create(f"{name}-{i}", "zone-b", "zone-a").volume
            made.append(vol.volume_id)
            assert [dict(t.segments) for t in vol.accessible_topology] == [{ZONE: "zone-a"}]
            vols.append(vol)

        def publish(vol: pb.Volume) -> grpc.StatusCode:
            return status_of(lambda: driver.controller.ControllerPublishVolume(
                pb.ControllerPublishVolumeRequest(
                    volume_id=vol.volume_id, node_id=info.node_id,
                    volume_capability=mount_cap(Mode.SINGLE_NODE_WRITER))))

        assert publish(vols[0]) == grpc.StatusCode.OK
        assert publish(vols[0]) == grpc.StatusCode.OK  # the same again is not a second volume
        assert publish(vols[1]) == grpc.StatusCode.RESOURCE_EXHAUSTED
        driver.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
            volume_id=vols[0].volume_id, node_id=info.node_id))
        assert publish(vols[1]) == grpc.StatusCode.OK
        driver.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
            volume_id=vols[1].volume_id, node_id=info.node_id))
        # Two publishes to the node at once: never both, whatever the timing.
        for _ in range(5):
            with ThreadPoolExecutor(2) as pool:
                codes = list(pool.map(publish, vols))
            assert codes.count(grpc.StatusCode.OK) <= 1, codes
            assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.ABORTED,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
            listed = driver.controller.ListVolumes(pb.ListVolumesRequest()).entries
            held = [e.volume.volume_id for e in listed
                    if info.node_id in e.status.published_node_ids]
            assert len(held) == codes.count(grpc.StatusCode.OK), (held, codes)
            for volume_id in held:
                driver.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
                    volume_id=volume_id, node_id=info.node_id))
    finally:
        for volume_id in made:
            driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))
        assert driver.stop() == 0, driver.log()
