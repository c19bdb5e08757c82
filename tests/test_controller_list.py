"""ListVolumes: entries, max_entries/starting_token pagination, ABORTED on a bad token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver.csi import csi_pb2 as pb

from .conftest import status_of
from .harness import Driver, MiB, mount_cap, start_driver, write_config


@pytest.fixture(scope="module")
def lister(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    """A driver of its own so that the listing holds exactly what these tests made."""
    tmp = tmp_path_factory.mktemp("list")
    config = write_config(tmp / "c.yaml", {"a": {"type": "hostpath", "path": str(tmp / "a")},
                                           "b": {"type": "hostpath", "path": str(tmp / "b")}})
    d = start_driver(tmp, config)
    yield d
    assert d.stop() == 0


def make(d: Driver, name: str, backend: str) -> pb.Volume:
    return d.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name, parameters={"backend": backend}, volume_capabilities=[mount_cap()],
        capacity_range=pb.CapacityRange(required_bytes=MiB))).volume


def list_all(d: Driver, page: int) -> list[pb.ListVolumesResponse.Entry]:
    entries, token = [], ""
    while True:
        resp = d.controller.ListVolumes(pb.ListVolumesRequest(max_entries=page,
                                                              starting_token=token))
        assert len(resp.entries) <= page
        entries += resp.entries
        token = resp.next_token
        if not token:
            return entries


def test_empty_list(lister: Driver) -> None:
    assert list(lister.controller.ListVolumes(pb.ListVolumesRequest()).entries) == []


def test_lists_all_backends_and_pages(lister: Driver) -> None:
    made = [make(lister, f"v{i}", "ab"[i % 2]) for i in range(7)]
    try:
        everything = lister.controller.ListVolumes(pb.ListVolumesRequest())
        assert everything.next_token == ""
        assert {e.volume.volume_id for e in everything.entries} == {v.volume_id for v in made}
        assert all(e.volume.capacity_bytes == MiB for e in everything.entries)
        for page in (1, 2, 3, 7, 100):
            ids = [e.volume.volume_id for e in list_all(lister, page)]
            assert sorted(ids) == sorted(v.volume_id for v in made)
            assert len(ids) == len(set(ids))
    finally:
        for v in made:
            lister.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id))


def test_token_survives_deletion_between_pages(lister: Driver) -> None:
    made = [make(lister, f"d{i}", "a") for i in range(4)]
    try:
        first = lister.controller.ListVolumes(pb.ListVolumesRequest(max_entries=2))
        seen = [e.volume.volume_id for e in first.entries]
        # Delete the last volume of the first page and the volume the token points at.
        for vid in (seen[-1], first.next_token):
            lister.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
        rest = lister.controller.ListVolumes(pb.ListVolumesRequest(
            max_entries=2, starting_token=first.next_token))
        remaining = {v.volume_id for v in made} - {seen[-1], first.next_token}
        assert {e.volume.volume_id for e in rest.entries} | set(seen[:-1]) == remaining
    finally:
        for v in made:
            lister.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id))


def test_bad_token_is_aborted(lister: Driver) -> None:
    code = status_of(lambda: lister.controller.ListVolumes(
        pb.ListVolumesRequest(starting_token="invalid-token")))
    assert code == grpc.StatusCode.ABORTED


def test_negative_max_entries(lister: Driver) -> None:
    code = status_of(lambda: lister.controller.ListVolumes(pb.ListVolumesRequest(max_entries=-1)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_listing_shows_topology(lister: Driver, tmp_path: Path) -> None:
    v = make(lister, "topo", "b")
    try:
        entries = lister.controller.ListVolumes(pb.ListVolumesRequest()).entries
        assert [e.volume.accessible_topology for e in entries] == [v.accessible_topology]
    finally:
        lister.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id))
