"""Nova is real enough: a server boots from a Cinder volume, and a volume of the test user
attaches and detaches through Nova's API with Cinder's attachment records to match."""

from __future__ import annotations

import time
import uuid

from .compute import NovaCloud
from .services import OpenStack


def _wait_status(cloud: OpenStack, vid: str, status: str, wait: float = 30) -> object:
    bs = cloud.user().block_storage
    deadline = time.monotonic() + wait
    while (vol := bs.get_volume(vid)).status != status:
        assert time.monotonic() < deadline, f"volume {vid} is {vol.status}, not {status}"
        time.sleep(0.1)
    return vol


def test_nova_attaches_and_detaches_a_user_volume(nova_cloud: NovaCloud,
                                                  openstack_cloud: OpenStack) -> None:
    print("nova start-up (s):", nova_cloud.timings)
    server = nova_cloud.boot_server(f"harness-{uuid.uuid4().hex[:6]}")
    user = openstack_cloud.user()
    vol = user.block_storage.create_volume(size=1, name=f"harness-{uuid.uuid4().hex[:6]}")
    try:
        _wait_status(openstack_cloud, vol.id, "available")
        resp = user.compute.post(f"/servers/{server}/os-volume_attachments", microversion="2.79",
                                 json={"volumeAttachment": {"volumeId": vol.id}})
        assert resp.status_code == 200, resp.text
        got = _wait_status(openstack_cloud, vol.id, "in-use")
        assert [a["server_id"] for a in got.attachments] == [server]  # type: ignore[attr-defined]
        resp = user.compute.delete(f"/servers/{server}/os-volume_attachments/{vol.id}",
                                   microversion="2.79")
        assert resp.status_code == 202, resp.text
        _wait_status(openstack_cloud, vol.id, "available")
    finally:
        user.block_storage.delete_volume(vol, ignore_missing=True)
        nova_cloud.delete_server(server)
