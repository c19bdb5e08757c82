"""The session's real Ceph cluster, as a pytest fixture. Import it into a conftest.py:

    from .ceph.fixtures import ceph_cluster  # noqa: F401

The cluster is started on first use only, so a session that runs no Ceph test starts none.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator

import pytest

from .cluster import CephCluster, missing_packages, start_cluster
from .filesystem import Filesystem, add_filesystem

# With a mgr, as on any real cluster: pool statistics (GetCapacity, `ceph df`) come from it.
# Without one the cluster starts as fast and uses ~300 MB less; librbd does not need it.
WITH_MGR = True

def _end_fuse_clients(under: str) -> None:
    """End rbd-fuse (with their loop devices) and ceph-fuse processes a failed test left under
    `under`, before the cluster goes: once it has, any access to their files (even `losetup
    -a`) would hang."""
    from csi_driver.node import loop

    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")[:-1]
        except OSError:
            continue
        if len(argv) < 2 or not argv[-1].startswith(under):
            continue
        if argv[0] == "ceph-fuse":  # hung callers are freed only by its SIGKILL
            subprocess.run(["umount", "-l", argv[-1]], check=False, timeout=30)
            os.kill(int(pid), signal.SIGKILL)
            continue
        if argv[0] != "rbd-fuse":
            continue
        where = argv[-1]  # rbd-fuse ... -r IMAGE MOUNTPOINT
        image = os.path.join(where, os.path.basename(where))
        for device in loop.attached(image):
            subprocess.run(["losetup", "-d", device], check=False, timeout=30)
        subprocess.run(["umount", "-l", where], check=False, timeout=30)
        os.kill(int(pid), signal.SIGKILL)


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """A single-node cluster (1 mon, 1 osd, a mgr if WITH_MGR) on 127.0.0.1 for the whole
    session: pool `rbd` ready, clone v2 on, user client.csi. Fails (never skips) when Ceph is not
    installed: CI installs it, and a skipped backend would pass unnoticed."""
    missing = missing_packages(mgr=WITH_MGR)
    if missing:
        pytest.fail(
            f"Ceph packages missing: {' '.join(missing)}. Install them with scripts/install-ceph "
            f"(apt-get install --no-install-recommends {' '.join(missing)}).",
            pytrace=False,
        )
    cluster = start_cluster(tmp_path_factory.mktemp("ceph"), mgr=WITH_MGR)
    try:
        yield cluster
    finally:
        _end_fuse_clients(str(tmp_path_factory.getbasetemp()))
        cluster.stop()
        # Keep config and logs for a look after the run; drop the stores, among them the OSD's
        # block file (sparse, 10 GiB apparent).
        for store in ("osd", "mon"):
            shutil.rmtree(cluster.base / store, ignore_errors=True)


@pytest.fixture(scope="session")
def cephfs(ceph_cluster: CephCluster) -> Filesystem:
    """A CephFS on the session's cluster (mds.a, filesystem `cephfs`, group `csi`, user
    client.csifs with ceph-csi's caps), added on first use."""
    missing = [tool for tool in ("ceph-mds", "ceph-fuse") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"CephFS tools missing: {' '.join(missing)}. Install them with "
                    "scripts/install-ceph.", pytrace=False)
    return add_filesystem(ceph_cluster)
