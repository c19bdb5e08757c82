"""CreateVolume: required fields, capacity range rules, capabilities, parameters, topology,
idempotency by name and ALREADY_EXISTS on a conflicting repeat."""

from __future__ import annotations

import grpc
import pytest

from csi_driver.csi import csi_pb2 as pb

from .conftest import status_of
from .harness import NODE_ID, TOPOLOGY_KEY, Driver, GiB, MiB, block_cap, mount_cap

Mode = pb.VolumeCapability.AccessMode


def create(driver: Driver, name: str, **kw: object) -> pb.CreateVolumeResponse:
    kw.setdefault("volume_capabilities", [mount_cap()])
    return driver.controller.CreateVolume(pb.CreateVolumeRequest(name=name, **kw))


def delete(driver: Driver, volume_id: str) -> None:
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))


def test_creates_volume_with_requested_size_and_topology(driver: Driver, name: str) -> None:
    vol = create(driver, name, capacity_range=pb.CapacityRange(required_bytes=5 * MiB)).volume
    try:
        assert vol.volume_id.startswith("local:")
        assert vol.capacity_bytes == 5 * MiB
        assert [dict(t.segments) for t in vol.accessible_topology] == [{TOPOLOGY_KEY: NODE_ID}]
    finally:
        delete(driver, vol.volume_id)


def test_default_size_without_capacity_range(driver: Driver, name: str) -> None:
    vol = create(driver, name).volume
    delete(driver, vol.volume_id)
    assert vol.capacity_bytes == GiB


def test_default_size_is_capped_by_limit(driver: Driver, name: str) -> None:
    vol = create(driver, name, capacity_range=pb.CapacityRange(limit_bytes=3 * MiB)).volume
    delete(driver, vol.volume_id)
    assert vol.capacity_bytes == 3 * MiB


def test_missing_name(driver: Driver) -> None:
    assert status_of(lambda: create(driver, "")) == grpc.StatusCode.INVALID_ARGUMENT


def test_missing_capabilities(driver: Driver, name: str) -> None:
    code = status_of(lambda: create(driver, name, volume_capabilities=[]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("cap", [
    pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume()),  # no access mode
    pb.VolumeCapability(access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER)),  # no access type
    pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(),
                        access_mode=Mode(mode=Mode.UNKNOWN)),
], ids=["no-access-mode", "no-access-type", "unknown-mode"])
def test_malformed_capability(driver: Driver, name: str, cap: pb.VolumeCapability) -> None:
    code = status_of(lambda: create(driver, name, volume_capabilities=[cap]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("mode", [Mode.MULTI_NODE_MULTI_WRITER, Mode.MULTI_NODE_READER_ONLY,
                                  Mode.MULTI_NODE_SINGLE_WRITER])
def test_multi_node_modes_refused_for_node_local_volumes(driver: Driver, name: str,
                                                         mode: int) -> None:
    code = status_of(lambda: create(driver, name, volume_capabilities=[mount_cap(mode)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("mode", [Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY,
                                  Mode.SINGLE_NODE_SINGLE_WRITER, Mode.SINGLE_NODE_MULTI_WRITER])
def test_single_node_modes_accepted(driver: Driver, name: str, mode: int) -> None:
    vol = create(driver, name, volume_capabilities=[mount_cap(mode)]).volume
    delete(driver, vol.volume_id)
    assert vol.volume_id


def test_block_and_mount_in_one_request_refused(driver: Driver, name: str) -> None:
    code = status_of(lambda: create(driver, name,
                                    volume_capabilities=[block_cap(), mount_cap()]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("rng", [
    pb.CapacityRange(required_bytes=-1),
    pb.CapacityRange(limit_bytes=-1),
    pb.CapacityRange(required_bytes=2 * MiB, limit_bytes=MiB),
], ids=["negative-required", "negative-limit", "required-over-limit"])
def test_bad_capacity_range(driver: Driver, name: str, rng: pb.CapacityRange) -> None:
    code = status_of(lambda: create(driver, name, capacity_range=rng))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_repeat_returns_same_volume(driver: Driver, name: str) -> None:
    rng = pb.CapacityRange(required_bytes=MiB)
    first = create(driver, name, capacity_range=rng).volume
    second = create(driver, name, capacity_range=rng).volume
    delete(driver, first.volume_id)
    assert first == second


def test_repeat_with_other_capacity_is_already_exists(driver: Driver, name: str) -> None:
    vol = create(driver, name, capacity_range=pb.CapacityRange(required_bytes=MiB)).volume
    try:
        code = status_of(lambda: create(
            driver, name, capacity_range=pb.CapacityRange(required_bytes=2 * MiB)))
        assert code == grpc.StatusCode.ALREADY_EXISTS
    finally:
        delete(driver, vol.volume_id)


def test_repeat_with_other_parameters_is_already_exists(driver: Driver, name: str) -> None:
    vol = create(driver, name, parameters={"layout": "directory"}).volume
    try:
        code = status_of(lambda: create(driver, name, parameters={"layout": "image"}))
        assert code == grpc.StatusCode.ALREADY_EXISTS
        # The provisioner's metadata names the claim; it does not shape the volume, and the
        # backend never sees it as a parameter: a repeat is judged on the backend's own.
        again = create(driver, name, parameters={"layout": "directory",
                                                 "csi.storage.k8s.io/pvc/name": "b"}).volume
        assert again.volume_id == vol.volume_id
    finally:
        delete(driver, vol.volume_id)


def test_maximum_length_name(driver: Driver) -> None:
    long_name = "x" * 128
    vol = create(driver, long_name).volume
    again = create(driver, long_name).volume
    delete(driver, vol.volume_id)
    assert vol.volume_id == again.volume_id
    assert len(vol.volume_id.encode()) <= 128


def test_names_with_odd_characters_get_distinct_safe_ids(driver: Driver) -> None:
    names = ["../../etc/passwd", "Weird Name/with spaces", "weird-name-with-spaces"]
    vols = [create(driver, n).volume for n in names]
    for v in vols:
        delete(driver, v.volume_id)
    assert len({v.volume_id for v in vols}) == len(names)
    assert all("/" not in v.volume_id and ".." not in v.volume_id for v in vols)


def test_unknown_backend_parameter(driver: Driver, name: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        create(driver, name, parameters={"backend": "nope"})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nope" in err.value.details() and "local" in err.value.details()


def test_unknown_parameter_named_in_error(driver: Driver, name: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        create(driver, name, parameters={"fooBar": "1"})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "fooBar" in err.value.details()


def test_kubernetes_parameters_and_backend_are_accepted(driver: Driver, name: str) -> None:
    params = {"backend": "local", "csi.storage.k8s.io/pvc/name": "claim",
              "csi.storage.k8s.io/pvc/namespace": "default"}
    vol = create(driver, name, parameters=params).volume
    delete(driver, vol.volume_id)
    assert vol.volume_id.startswith("local:")


@pytest.mark.parametrize("source", [
    pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id="local:s")),
    pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id="bad")),
    pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id="local:v")),
], ids=["snapshot", "malformed-snapshot", "volume"])
def test_missing_content_source_is_not_found(driver: Driver, name: str,
                                             source: pb.VolumeContentSource) -> None:
    code = status_of(lambda: create(driver, name, volume_content_source=source))
    assert code == grpc.StatusCode.NOT_FOUND


def test_requisite_topology_of_this_node(driver: Driver, name: str) -> None:
    req = pb.TopologyRequirement(
        requisite=[pb.Topology(segments={TOPOLOGY_KEY: "other"}),
                   pb.Topology(segments={TOPOLOGY_KEY: NODE_ID})],
        preferred=[pb.Topology(segments={TOPOLOGY_KEY: NODE_ID})])
    vol = create(driver, name, accessibility_requirements=req).volume
    delete(driver, vol.volume_id)
    assert dict(vol.accessible_topology[0].segments) == {TOPOLOGY_KEY: NODE_ID}


def test_requisite_topology_elsewhere_is_resource_exhausted(driver: Driver, name: str) -> None:
    req = pb.TopologyRequirement(requisite=[pb.Topology(segments={TOPOLOGY_KEY: "other"})])
    code = status_of(lambda: create(driver, name, accessibility_requirements=req))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
