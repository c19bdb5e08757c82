"""The test cloud is real: Keystone checks credentials, Cinder makes RBD images where asked."""

from __future__ import annotations

import time
import uuid

import pytest
from keystoneauth1 import exceptions as ks
from openstack import exceptions as sdk

from ..ceph.cluster import CephCluster
from .services import OpenStack


def test_keystone_checks_passwords(openstack_cloud: OpenStack) -> None:
    assert openstack_cloud.user().authorize()
    wrong = openstack_cloud._connect(openstack_cloud.username, "wrong", openstack_cloud.project)
    with pytest.raises((ks.http.Unauthorized, sdk.SDKException), match="HTTP 401"):
        wrong.authorize()


def test_cinder_makes_rbd_images_in_the_zone_asked(openstack_cloud: OpenStack,
                                                     ceph_cluster: CephCluster) -> None:
    print("cloud start-up (s):", openstack_cloud.timings)
    bs = openstack_cloud.user().block_storage
    vol = bs.create_volume(size=1, name=f"harness-{uuid.uuid4().hex[:6]}",
                           availability_zone="az2", volume_type="ceph2")
    try:
        vol = bs.wait_for_status(vol, "available", failures=["error"], wait=60)
        assert vol.availability_zone == "az2"
        assert f"volume-{vol.id}" in ceph_cluster.rbd("ls", "volumes2").split()
        connector = {"host": "harness-node", "ip": "127.0.0.1", "initiator": "",
                     "platform": "x86_64", "os_type": "linux", "multipath": False}
        att = bs.post("/attachments", json={"attachment": {"volume_uuid": vol.id,
                                                           "connector": connector}},
                      microversion="3.54").json()["attachment"]
        info = att["connection_info"]
        assert info["driver_volume_type"] == "rbd" and info["auth_username"] == "cinder"
        assert info["name"] == f"volumes2/volume-{vol.id}"
        bs.delete(f"/attachments/{att['id']}", microversion="3.54")
    finally:
        bs.delete_volume(vol)
        deadline = time.monotonic() + 60
        while bs.find_volume(vol.id) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
