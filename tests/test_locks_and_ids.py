"""Keyed in-flight locks and ID parsing."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from csi_driver import ids
from csi_driver.csi import csi_pb2 as pb
from csi_driver.errors import Aborted
from csi_driver.locks import KeyedLocks

from .conftest import status_of
from .harness import Driver, mount_cap


def test_second_holder_of_a_key_is_aborted() -> None:
    locks = KeyedLocks()
    with locks.hold("a", "b"):
        with pytest.raises(Aborted, match="already in progress"), locks.hold("b"):
            pass
        with locks.hold("c"):  # unrelated keys never wait
            pass
    with locks.hold("a"):  # released after use, also after an error
        pass


def test_lock_released_after_exception() -> None:
    locks = KeyedLocks()
    with pytest.raises(RuntimeError), locks.hold("k"):
        raise RuntimeError
    with locks.hold("k"):
        pass


def test_concurrent_creates_of_one_name_make_one_volume(driver: Driver, name: str) -> None:
    barrier = threading.Barrier(16)

    def create() -> tuple[grpc.StatusCode, str]:
        barrier.wait()
        try:
            resp = driver.controller.CreateVolume(pb.CreateVolumeRequest(
                name=name, volume_capabilities=[mount_cap()]))
        except grpc.RpcError as exc:
            return exc.code(), ""
        return grpc.StatusCode.OK, resp.volume.volume_id

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: create(), range(16)))
    codes = {c for c, _ in results}
    made = {v for c, v in results if c == grpc.StatusCode.OK}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.ABORTED}
    assert len(made) == 1
    data = Path(driver.socket).parent / "data" / "volumes"
    assert (data / made.pop().split(":")[1]).is_dir()
    driver.controller.DeleteVolume(pb.DeleteVolumeRequest(
        volume_id=next(v for c, v in results if v)))
    assert status_of(lambda: driver.controller.DeleteVolume(
        pb.DeleteVolumeRequest(volume_id="local:x"))) == grpc.StatusCode.OK


@pytest.mark.parametrize("raw", ["", "nocolon", ":x", "a:", "UP:x", "a:../x", "a:.hidden",
                                 "a:x/y", "a:" + "x" * 127, "-a:x"])
def test_malformed_ids(raw: str) -> None:
    assert ids.parse(raw) is None


def test_longest_ids_fit_in_128_bytes() -> None:
    local = ids.local_id_for_name("n" * 500)
    full = f"{'b' * 63}:{local}.99"  # longest backend name, group-member suffix
    assert len(full.encode()) <= 128 and ids.parse(full) is not None


def test_id_round_trip() -> None:
    local = ids.local_id_for_name("pvc-1234/../x")
    parsed = ids.parse(f"local:{local}")
    assert parsed is not None and parsed.local == local and "/" not in local
    assert ids.local_id_for_name("same") == ids.local_id_for_name("same")
    assert ids.local_id_for_name("a") != ids.local_id_for_name("A")
