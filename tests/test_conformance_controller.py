"""What csi-sanity v5.5.0 checks with its default flags, beyond the other controller tests:
ControllerModifyVolume with an empty map, GetSnapshot (now advertised), GroupController codes and
a request grpcio cannot decode."""

from __future__ import annotations

import grpc
import pytest

from csi_driver.csi import csi_pb2 as pb

from .conftest import status_of
from .harness import Driver, MiB, mount_cap

RPC = pb.ControllerServiceCapability.RPC


def _create(driver: Driver, name: str) -> pb.Volume:
    return driver.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name, capacity_range=pb.CapacityRange(required_bytes=MiB),
        volume_capabilities=[mount_cap()])).volume


def _modify(driver: Driver, volume_id: str, **params: str) -> grpc.StatusCode:
    return status_of(lambda: driver.controller.ControllerModifyVolume(
        pb.ControllerModifyVolumeRequest(volume_id=volume_id, mutable_parameters=params)))


# -- ControllerModifyVolume ------------------------------------------------------------------
@pytest.mark.parametrize("params", [{}, {"readOnly": "true"}], ids=["empty", "valid"])
def test_modify_checks_the_volume_before_the_parameters(driver: Driver,
                                                         params: dict[str, str]) -> None:
    assert _modify(driver, "", **params) == grpc.StatusCode.INVALID_ARGUMENT
    for vid in ("non-existing-volume-id", "local:pvc-never-made", "other-backend:x"):
        assert _modify(driver, vid, **params) == grpc.StatusCode.NOT_FOUND, vid


def test_modify_with_empty_map_is_a_no_op(driver: Driver, name: str) -> None:
    vol = _create(driver, name)
    try:
        assert _modify(driver, vol.volume_id, readOnly="true") == grpc.StatusCode.OK
        assert _modify(driver, vol.volume_id) == grpc.StatusCode.OK
        got = driver.controller.ControllerGetVolume(
            pb.ControllerGetVolumeRequest(volume_id=vol.volume_id)).volume
        assert got == vol
        # The earlier change stands: an empty map changes nothing.
        assert _modify(driver, vol.volume_id, XXX_FakeKey="XXX_FakeValue") == \
            grpc.StatusCode.INVALID_ARGUMENT
    finally:
        driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))


# -- GetSnapshot -----------------------------------------------------------------------------
def test_get_snapshot_is_advertised(driver: Driver) -> None:
    caps = {c.rpc.type for c in driver.controller.ControllerGetCapabilities(
        pb.ControllerGetCapabilitiesRequest()).capabilities}
    assert RPC.GET_SNAPSHOT in caps


def _get(driver: Driver, snapshot_id: str) -> grpc.StatusCode:
    return status_of(lambda: driver.controller.GetSnapshot(
        pb.GetSnapshotRequest(snapshot_id=snapshot_id)))


@pytest.mark.parametrize("snapshot_id", [
    "none-exist-id", "local:snap-never-made", "other-backend:x", "local:../../etc", "local:",
    ":x", "local:" + "a" * 300,
])
def test_get_snapshot_unknown_is_not_found(driver: Driver, snapshot_id: str) -> None:
    assert _get(driver, snapshot_id) == grpc.StatusCode.NOT_FOUND


def test_get_snapshot_needs_an_id(driver: Driver) -> None:
    assert _get(driver, "") == grpc.StatusCode.INVALID_ARGUMENT


def test_get_snapshot_returns_the_one_asked_for(driver: Driver, name: str) -> None:
    """As csi-sanity does: three volumes with a snapshot each, then the middle one by ID."""
    vols = [_create(driver, f"{name}-{i}") for i in range(3)]
    snaps = [driver.controller.CreateSnapshot(pb.CreateSnapshotRequest(
        name=f"{name}-snap-{i}", source_volume_id=v.volume_id)).snapshot
        for i, v in enumerate(vols)]
    try:
        got = driver.controller.GetSnapshot(
            pb.GetSnapshotRequest(snapshot_id=snaps[1].snapshot_id)).snapshot
        assert got == snaps[1]
        assert got.source_volume_id == vols[1].volume_id
        assert got.size_bytes == vols[1].capacity_bytes
        assert got.creation_time.seconds > 0 and got.ready_to_use
        listed = driver.controller.ListSnapshots(
            pb.ListSnapshotsRequest(snapshot_id=snaps[1].snapshot_id)).entries
        assert [e.snapshot for e in listed] == [got]
        driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(
            snapshot_id=snaps[1].snapshot_id))
        assert _get(driver, snaps[1].snapshot_id) == grpc.StatusCode.NOT_FOUND
    finally:
        for s in snaps:
            driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=s.snapshot_id))
        for v in vols:
            driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id))


# -- GroupController (csi-sanity's default IDs) -----------------------------------------------
def test_group_controller_codes(driver: Driver) -> None:
    from csi_driver.csi import csi_pb2_grpc as pb_grpc

    groups = pb_grpc.GroupControllerStub(driver.channel)
    assert status_of(lambda: groups.CreateVolumeGroupSnapshot(
        pb.CreateVolumeGroupSnapshotRequest())) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(lambda: groups.GetVolumeGroupSnapshot(
        pb.GetVolumeGroupSnapshotRequest())) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(lambda: groups.DeleteVolumeGroupSnapshot(
        pb.DeleteVolumeGroupSnapshotRequest())) == grpc.StatusCode.INVALID_ARGUMENT
    for gid in ("fake-vol-id", "local:fake-vol-id"):
        assert status_of(lambda g=gid: groups.GetVolumeGroupSnapshot(  # type: ignore[misc]
            pb.GetVolumeGroupSnapshotRequest(group_snapshot_id=g))) == grpc.StatusCode.NOT_FOUND
        groups.DeleteVolumeGroupSnapshot(pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=gid))


# -- requests that do not decode -------------------------------------------------------------
@pytest.mark.parametrize("raw", [
    b"\x0a\x01\xff",  # name (field 1) = one byte that is not UTF-8
    b"\x0a\x02\xff\xfe",
    b"\x0a\x09ab",  # name says 9 bytes, 2 follow
], ids=["bad-utf8", "bad-utf8-2", "truncated"])
def test_undecodable_request_is_invalid_argument(driver: Driver, raw: bytes) -> None:
    call = driver.channel.unary_unary("/csi.v1.Controller/CreateVolume",
                                      request_serializer=None,
                                      response_deserializer=pb.CreateVolumeResponse.FromString)
    with pytest.raises(grpc.RpcError) as err:
        call(raw, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request" in err.value.details()
    assert "CreateVolumeRequest" in err.value.details()
    assert any("rpc=/csi.v1.Controller/CreateVolume" in line and "status=INVALID_ARGUMENT" in line
               and "malformed request" in line for line in driver.log().splitlines())


def test_hand_encoded_request_still_works(driver: Driver, name: str) -> None:
    """The driver decodes the bytes itself now: a well-formed hand-made request is served."""
    request = pb.CreateVolumeRequest(name=name, volume_capabilities=[mount_cap()])
    call = driver.channel.unary_unary("/csi.v1.Controller/CreateVolume",
                                      request_serializer=None,
                                      response_deserializer=pb.CreateVolumeResponse.FromString)
    vol = call(request.SerializeToString(), timeout=10).volume
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert vol.volume_id.startswith("local:")
