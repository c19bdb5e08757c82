"""The session's real NFS server and a driver that reaches it, as pytest fixtures.

Import into a conftest.py. The server starts on first use only; missing packages fail the test
(never skip it): CI installs them with scripts/install-nfs.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..harness import Driver, start_driver, write_config
from .server import NfsServer, missing_packages, start_server


@pytest.fixture(scope="session")
def nfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NfsServer]:
    missing = missing_packages()
    if missing:
        pytest.fail(f"NFS test packages missing: {' '.join(missing)}; run scripts/install-nfs",
                    pytrace=False)
    server = start_server(tmp_path_factory.mktemp("nfs"))
    try:
        yield server
    finally:
        server.stop()


def nfs_backend(nfs: NfsServer, **extra: Any) -> dict[str, Any]:
    return {"type": "nfs", "server": nfs.address, "share": "/export",
            "copyWaitSeconds": 2, "timeoutSeconds": 5, **extra}


def start_nfs_driver(server: NfsServer, tmp: Path, backends: dict[str, Any] | None = None,
                     *args: str, env: dict[str, str] | None = None) -> Driver:
    """A driver (controller and node, unless `args` say otherwise) running inside the
    server's network namespace."""
    config = write_config(tmp / "config.yaml", backends or {"nfs": nfs_backend(server)})
    return start_driver(tmp, config, *args, prefix=server.in_netns([]), env=env)


@pytest.fixture(scope="session")
def nfs_driver(nfs_server: NfsServer, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Driver]:
    tmp = tmp_path_factory.mktemp("nfs-driver")
    running = start_nfs_driver(nfs_server, tmp, {
        "nfs": nfs_backend(nfs_server),
        "tree": nfs_backend(nfs_server, subDir="${pvc.metadata.namespace}/${pvc.metadata.name}",
                            onDelete="archive"),
    })
    yield running
    assert running.stop() == 0, running.log()
    shutil.rmtree(nfs_server.export_dir / ".berth" / "trash", ignore_errors=True)
