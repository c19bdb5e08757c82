"""The test cluster works for real: the restricted csi user can do what the RBD backend does,
and bad credentials or an unreachable cluster fail in seconds, not minutes.

rados/rbd (python3-rados, python3-rbd) are imported inside the tests: a missing package then
fails these tests (and the fixture, with an install hint) instead of the whole suite's collection.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pytest

from .cluster import CLIENT_TIMEOUT_KEYS, LOOPBACK, CephCluster, pick_mon_ports

# `ceph_cluster` is the session fixture of tests/conftest.py (tests/ceph/fixtures.py has one to
# import there). Not imported here: a second definition would start a second cluster.

MiB = 1024 * 1024


@contextmanager
def connected(conf: dict[str, str], user: str) -> Iterator[Any]:
    """A librados connection as USER from a conf dict alone (no ceph.conf), shut down after."""
    import rados  # type: ignore[import-not-found,unused-ignore]

    client = rados.Rados(rados_id=user, conf=conf)
    client.connect()
    try:
        yield client
    finally:
        client.shutdown()


def test_csi_user_image_lifecycle(ceph_cluster: CephCluster) -> None:
    """create, write, resize, snapshot, clone v2 (no protect), flatten, remove, as client.csi."""
    import rbd  # type: ignore[import-not-found,unused-ignore]

    c = ceph_cluster
    with connected(c.client_conf(), c.csi_user) as client, client.open_ioctx(c.pool) as ioctx:
        api = rbd.RBD()
        api.create(ioctx, "parent", 64 * MiB)
        try:
            with rbd.Image(ioctx, "parent") as img:
                img.write(b"berth" * 100, 0)
                img.resize(128 * MiB)
                assert img.size() == 128 * MiB
                img.create_snap("snap")
            # Clone v2: no protect_snap() first (require-min-compat-client mimic).
            api.clone(ioctx, "parent", "snap", ioctx, "child")
            with rbd.Image(ioctx, "child") as child:
                assert child.read(0, 500) == b"berth" * 100
                assert child.parent_info()[1:] == ("parent", "snap")
                child.flatten()
                child.resize(256 * MiB)
            assert sorted(api.list(ioctx)) == ["child", "parent"]
            api.remove(ioctx, "child")
            with rbd.Image(ioctx, "parent") as img:
                img.remove_snap("snap")
        finally:
            for name in ("child", "parent"):
                with suppress(rbd.ImageNotFound):
                    api.remove(ioctx, name)
        assert api.list(ioctx) == []


def test_csi_user_is_restricted(ceph_cluster: CephCluster) -> None:
    """client.csi has the rbd profile on its pool only: no pool admin."""
    c = ceph_cluster
    with connected(c.client_conf(), c.csi_user) as client:
        ret, _, err = client.mon_command(
            json.dumps({"prefix": "osd pool create", "pool": "not-allowed"}), b"", timeout=10)
        assert ret != 0, err
        assert "not-allowed" not in client.list_pools()


def test_bad_credentials_and_no_cluster_fail_fast(ceph_cluster: CephCluster) -> None:
    """A wrong key is refused at once; with nothing listening, client_mount_timeout bounds the
    connect (without it librados hunts for 300 s; `connect(timeout=)` does not bound it)."""
    import rados

    c = ceph_cluster
    wrong = "AQBTeAprFRfBEBAAx6I/eBU7POPLjKE8w/Ivvw=="
    assert wrong != c.csi_key
    for user, key in ((c.csi_user, wrong), ("nobody", c.csi_key)):
        t0 = time.monotonic()
        with pytest.raises(rados.PermissionDeniedError), connected(c.client_conf(key, 5), user):
            pass
        assert time.monotonic() - t0 < 3

    port, _ = pick_mon_ports()
    conf = {"mon_host": f"v2:{LOOPBACK}:{port}", "key": c.csi_key}
    conf.update({k: "2" for k in CLIENT_TIMEOUT_KEYS})
    t0 = time.monotonic()
    with pytest.raises(rados.TimedOut), connected(conf, c.csi_user):
        pass
    assert time.monotonic() - t0 < 5


def test_osd_op_timeout_bounds_a_stuck_write(ceph_cluster: CephCluster) -> None:
    """rados_osd_op_timeout ends an I/O that no OSD can serve (a pool mapped to no OSD)."""
    import rados

    c = ceph_cluster
    c.ceph("osd", "crush", "add-bucket", "nowhere", "root")
    c.ceph("osd", "crush", "rule", "create-replicated", "nowhere", "nowhere", "osd")
    c.ceph("osd", "pool", "create", "stuck", "1", "1", "replicated", "nowhere")
    try:
        conf = {"mon_host": c.monitors, "key": c.admin_key()}
        conf.update({k: "2" for k in CLIENT_TIMEOUT_KEYS})
        with connected(conf, "admin") as client, client.open_ioctx("stuck") as ioctx:
            t0 = time.monotonic()
            with pytest.raises(rados.TimedOut):
                ioctx.write_full("x", b"y")
            assert time.monotonic() - t0 < 5
    finally:
        c.ceph("osd", "pool", "rm", "stuck", "stuck", "--yes-i-really-really-mean-it")
        c.ceph("osd", "crush", "rule", "rm", "nowhere")
        c.ceph("osd", "crush", "remove", "nowhere")
