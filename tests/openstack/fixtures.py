"""The session's real OpenStack, as pytest fixtures (import them into a conftest.py).

Real: Keystone 22 and Cinder 21 from Debian 12 (Keystone checks every credential, keystonemiddleware
every token), Cinder's RBD driver making real RBD images on the session's Ceph, two availability
zones (one Cinder backend each), quotas, attachments with real rbd connection info. Started on
first use only, once per session (Ceph first, then ~3 s for Keystone and Cinder).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..ceph.cluster import CephCluster
from .services import OpenStack, missing, start_cloud

__all__ = ["OpenStack", "openstack_cloud"]


@pytest.fixture(scope="session")
def openstack_cloud(ceph_cluster: CephCluster, tmp_path_factory: pytest.TempPathFactory
                    ) -> Iterator[OpenStack]:
    """Keystone + Cinder on the session's Ceph. Fails (never skips) when the packages are
    missing: CI installs them (scripts/install-openstack), and a skipped backend would pass
    unnoticed."""
    lost = missing()
    if lost:
        pytest.fail(f"OpenStack packages missing: {', '.join(lost)}. Install them with "
                    "scripts/install-openstack.", pytrace=False)
    cloud = start_cloud(tmp_path_factory.mktemp("openstack"), ceph_cluster)
    try:
        yield cloud
    finally:
        cloud.stop()
