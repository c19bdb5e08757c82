"""`csi-driver check --config`: one line per backend, and an exit code that says whether the
config can serve volumes, against real backends (hostPath, Ganesha, Ceph) and broken ones."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .ceph.cluster import CephCluster
from .harness import write_config
from .nfs.fixtures import nfs_backend
from .nfs.server import SILENT_ADDRESS, NfsServer
from .test_rbd import rbd_config


def check(config: Path, *extra: str, prefix: list[str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(prefix or []), sys.executable, "-m", "csi_driver", "check",
                           "--config", str(config), *extra],
                          capture_output=True, text=True, timeout=120)


def lines(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """Each backend's line, by backend name."""
    return {line.split()[1]: line for line in result.stdout.splitlines()
            if line.startswith(("ok ", "FAIL "))}


def test_hostpath_good_and_broken(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    config = write_config(tmp_path / "c.yaml", {
        "good": {"type": "hostpath", "path": str(tmp_path / "data")},
        "broken": {"type": "hostpath", "path": str(tmp_path / "a-file" / "data")}})
    result = check(config)
    assert result.returncode == 1, result.stdout + result.stderr
    got = lines(result)
    assert got["good"].startswith("ok    good (hostpath): ") and "GiB available" in got["good"]
    assert got["broken"].startswith("FAIL  broken (hostpath): UNAVAILABLE")
    assert "Traceback" not in result.stdout + result.stderr


def test_config_that_does_not_load(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("backends:\n  x:\n    type: hostpath\n    pth: /tmp\n")
    result = check(config)
    assert result.returncode == 2
    assert "backends.x" in result.stdout and "Traceback" not in result.stdout + result.stderr


def test_nfs_reachable_and_not(nfs_server: NfsServer, tmp_path: Path) -> None:
    backends: dict[str, Any] = {
        "nfs": nfs_backend(nfs_server),
        "gone": {**nfs_backend(nfs_server), "server": SILENT_ADDRESS, "timeoutSeconds": 1},
        "noexport": nfs_backend(nfs_server, share="/no-such-export")}
    config = write_config(tmp_path / "c.yaml", backends)
    started = time.monotonic()
    result = check(config, "--timeout", "10", prefix=nfs_server.in_netns([]))
    assert time.monotonic() - started < 60
    assert result.returncode == 1, result.stdout + result.stderr
    got = lines(result)
    assert got["nfs"].startswith("ok    nfs (nfs): ")
    assert got["gone"].startswith("FAIL  gone (nfs): UNAVAILABLE")
    assert got["noexport"].startswith("FAIL  noexport (nfs): NOT_FOUND")


def test_rbd_good_pool_and_missing_pool(ceph_cluster: CephCluster, tmp_path: Path) -> None:
    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    good = rbd_config(ceph_cluster, tmp_path / "good")
    result = check(good)
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines(result)["ceph"].startswith("ok    ceph (rbd): ")
    bad = rbd_config(ceph_cluster, tmp_path / "bad", pool="no-such-pool")
    result = check(bad)
    assert result.returncode == 1
    assert lines(result)["ceph"].startswith("FAIL  ceph (rbd): ")
    assert "no-such-pool" in result.stdout and "Traceback" not in result.stdout + result.stderr
