"""DeleteVolume, ValidateVolumeCapabilities, GetCapacity, ControllerGetCapabilities and the RPCs
the controller does not offer."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from csi_driver.csi import csi_pb2 as pb

from .conftest import status_of
from .harness import (
    NODE_ID,
    TOPOLOGY_KEY,
    Driver,
    MiB,
    block_cap,
    mount_cap,
    start_driver,
    write_config,
)

Mode = pb.VolumeCapability.AccessMode
RPC = pb.ControllerServiceCapability.RPC


# -- DeleteVolume ---------------------------------------------------------------------------
def test_delete_missing_id(driver: Driver) -> None:
    code = status_of(lambda: driver.controller.DeleteVolume(pb.DeleteVolumeRequest()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("volume_id", ["local:pvc-never-made", "no-such-backend:x", "garbage",
                                       "local:../../etc", "../../etc", "local:" + "a" * 200])
def test_delete_unknown_or_malformed_is_success(driver: Driver, volume_id: str) -> None:
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))


def test_delete_removes_directory_and_is_idempotent(driver: Driver, name: str,
                                                    tmp_path_factory: pytest.TempPathFactory
                                                    ) -> None:
    vol = driver.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name, volume_capabilities=[mount_cap()])).volume
    local = vol.volume_id.split(":", 1)[1]
    data_root = Path(driver.socket).parent / "data" / "volumes"
    assert (data_root / local).is_dir()
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert not (data_root / local).exists()
    assert os.listdir(data_root.parent / ".trash") == []
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))


def test_traversal_id_never_touches_files(driver: Driver, tmp_path: Path) -> None:
    victim = Path(driver.socket).parent / "data" / "victim"
    victim.mkdir(exist_ok=True)
    for vid in ("local:../victim", "local:..", "local:.", "local:/etc"):
        driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
    assert victim.is_dir()


# -- ValidateVolumeCapabilities -------------------------------------------------------------
def validate(driver: Driver, volume_id: str, caps: list[pb.VolumeCapability],
             **kw: object) -> pb.ValidateVolumeCapabilitiesResponse:
    return driver.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
        volume_id=volume_id, volume_capabilities=caps, **kw))


def test_validate_missing_id(driver: Driver) -> None:
    code = status_of(lambda: validate(driver, "", [mount_cap()]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_validate_missing_caps(driver: Driver, volume: pb.Volume) -> None:
    code = status_of(lambda: validate(driver, volume.volume_id, []))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("volume_id", ["local:pvc-never-made", "garbage", "other:x"])
def test_validate_unknown_volume_is_not_found(driver: Driver, volume_id: str) -> None:
    code = status_of(lambda: validate(driver, volume_id, [mount_cap()]))
    assert code == grpc.StatusCode.NOT_FOUND


def test_validate_confirms_supported(driver: Driver, volume: pb.Volume) -> None:
    caps = [mount_cap(), mount_cap(Mode.SINGLE_NODE_READER_ONLY)]
    resp = validate(driver, volume.volume_id, caps, volume_context={"a": "b"})
    assert list(resp.confirmed.volume_capabilities) == caps
    assert dict(resp.confirmed.volume_context) == {"a": "b"}


@pytest.mark.parametrize("cap", [block_cap(), mount_cap(Mode.MULTI_NODE_MULTI_WRITER)],
                         ids=["block", "multi-node"])
def test_validate_unsupported_not_confirmed(driver: Driver, volume: pb.Volume,
                                            cap: pb.VolumeCapability) -> None:
    resp = validate(driver, volume.volume_id, [mount_cap(), cap])
    assert not resp.HasField("confirmed")
    assert resp.message


def test_validate_other_parameters_not_confirmed(driver: Driver, volume: pb.Volume) -> None:
    resp = validate(driver, volume.volume_id, [mount_cap()], parameters={"x": "y"})
    assert not resp.HasField("confirmed")
    assert "parameters" in resp.message


# -- GetCapacity ----------------------------------------------------------------------------
def test_capacity_is_free_space(driver: Driver) -> None:
    resp = driver.controller.GetCapacity(pb.GetCapacityRequest())
    st = os.statvfs(Path(driver.socket).parent / "data")
    free = st.f_bavail * st.f_frsize
    assert abs(resp.available_capacity - free) < 256 * MiB
    assert resp.maximum_volume_size.value == resp.available_capacity


def test_capacity_zero_for_unsupported_capability(driver: Driver) -> None:
    resp = driver.controller.GetCapacity(pb.GetCapacityRequest(
        volume_capabilities=[mount_cap(Mode.MULTI_NODE_MULTI_WRITER)]))
    assert resp.available_capacity == 0


def test_capacity_zero_for_other_node(driver: Driver) -> None:
    other = pb.Topology(segments={TOPOLOGY_KEY: "elsewhere"})
    ours = pb.Topology(segments={TOPOLOGY_KEY: NODE_ID})
    assert driver.controller.GetCapacity(
        pb.GetCapacityRequest(accessible_topology=other)).available_capacity == 0
    assert driver.controller.GetCapacity(
        pb.GetCapacityRequest(accessible_topology=ours)).available_capacity > 0


def test_capacity_unknown_backend(driver: Driver) -> None:
    code = status_of(lambda: driver.controller.GetCapacity(
        pb.GetCapacityRequest(parameters={"backend": "nope"})))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_configured_capacity_is_enforced(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", {"small": {
        "type": "hostpath", "path": str(tmp_path / "data"), "capacity": "10Mi"}})
    d = start_driver(tmp_path, config)
    try:
        def make(n: str, size: int) -> pb.CreateVolumeResponse:
            return d.controller.CreateVolume(pb.CreateVolumeRequest(
                name=n, capacity_range=pb.CapacityRange(required_bytes=size),
                volume_capabilities=[mount_cap()]))

        assert d.controller.GetCapacity(pb.GetCapacityRequest()).available_capacity == 10 * MiB
        first = make("a", 6 * MiB).volume
        assert d.controller.GetCapacity(pb.GetCapacityRequest()).available_capacity == 4 * MiB
        assert status_of(lambda: make("b", 6 * MiB)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        d.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=first.volume_id))
        make("b", 6 * MiB)
    finally:
        assert d.stop() == 0


# -- ControllerGetCapabilities and absent RPCs -----------------------------------------------
def test_controller_capabilities(driver: Driver) -> None:
    caps = {c.rpc.type for c in driver.controller.ControllerGetCapabilities(
        pb.ControllerGetCapabilitiesRequest()).capabilities}
    assert caps == {RPC.CREATE_DELETE_VOLUME, RPC.LIST_VOLUMES, RPC.GET_CAPACITY,
                    RPC.SINGLE_NODE_MULTI_WRITER, RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS,
                    RPC.GET_SNAPSHOT, RPC.CLONE_VOLUME, RPC.EXPAND_VOLUME, RPC.GET_VOLUME,
                    RPC.VOLUME_CONDITION, RPC.MODIFY_VOLUME}
    assert RPC.PUBLISH_UNPUBLISH_VOLUME not in caps


@pytest.mark.parametrize("call", [
    lambda c: c.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(volume_id="local:x")),
    lambda c: c.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id="local:x")),
], ids=["ControllerPublish", "ControllerUnpublish"])
def test_rpcs_not_offered_are_unimplemented(driver: Driver, call: object) -> None:
    assert callable(call)
    with pytest.raises(grpc.RpcError) as err:
        call(driver.controller)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
