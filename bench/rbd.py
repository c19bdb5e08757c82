"""The Ceph RBD backend under test: a throw-away single-node Ceph that the run starts and always
stops, the driver config and secrets for it, and the checks that nothing of it is left.

The cluster comes from tests/ceph/cluster.py (one mon, one osd, one mgr, cephx, loopback only),
in a directory of the run's work directory. Its daemons run in sessions of their own, so a Ctrl-C
or a SIGTERM reaches only the benchmark, which then stops them itself.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from .driver import REPO

if REPO not in sys.path:  # tests/ceph/cluster.py lives outside the bench package
    sys.path.insert(0, REPO)

from tests.ceph.cluster import (
    CephCluster,
    CephError,
    kill_leftovers,
    start_cluster,
)

__all__ = ["CephCluster", "CephError", "RbdRun", "running_cluster", "signals_interrupt"]

BACKEND = "ceph"
TIMEOUT_SECONDS = 10  # the backend's bound on every cluster call
PURGE_WAIT_S = 60.0  # how long the driver's background purger may take to empty the trash
PURGE_POLL_S = 0.5
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class RbdRun:
    """One cluster and what the driver and the scenarios need of it."""

    def __init__(self, cluster: CephCluster, workdir: str) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.node_dir = os.path.join(workdir, "node")
        self.key_file = os.path.join(workdir, "csi.key")
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(cluster.csi_key + "\n")

    @property
    def secrets(self) -> dict[str, str]:
        """What external-provisioner (and the node's stage) would send from the Secret."""
        return {"userID": self.cluster.csi_user, "userKey": self.cluster.csi_key}

    def backends(self) -> dict[str, Any]:
        return {BACKEND: {
            "type": "rbd", "pool": self.cluster.pool, "monitors": [self.cluster.monitors],
            "mounter": "fuse", "nodeStateDir": self.node_dir, "userID": self.cluster.csi_user,
            "userKeyFile": self.key_file, "timeoutSeconds": TIMEOUT_SECONDS,
        }}

    def meta(self) -> dict[str, Any]:
        try:
            version = self.cluster.ceph("version", timeout=30).strip()
        except CephError as exc:
            version = f"unknown ({exc})"
        return {"pool": self.cluster.pool, "monitors": self.cluster.monitors,
                "mounter": "fuse", "ceph_version": version,
                "cluster_start_s": dict(self.cluster.timings)}

    # -- what must be gone -------------------------------------------------------------------
    def pool_contents(self) -> tuple[list[str], list[str]]:
        """(images, trashed images) in the pool, by name."""
        pool = self.cluster.pool
        listed = json.loads(self.cluster.rbd("ls", "--format", "json", pool, timeout=30) or "[]")
        trash = json.loads(
            self.cluster.rbd("trash", "ls", "--format", "json", pool, timeout=30) or "[]")
        return sorted(listed), sorted(t["name"] for t in trash)

    def wait_for_empty_pool(self, limit: float = PURGE_WAIT_S) -> tuple[list[str], float | None]:
        """Wait (bounded) for the driver's purger to empty the trash; leaks, and how long it took
        (None when it did not finish). Call while the driver still runs."""
        t0 = time.monotonic()
        while True:
            try:
                images, trash = self.pool_contents()
            except CephError as exc:
                return [f"could not list the pool: {exc}"], None
            if not images and not trash:
                return [], time.monotonic() - t0
            if time.monotonic() - t0 >= limit:
                break
            time.sleep(PURGE_POLL_S)
        leaks = []
        if images:
            leaks.append(f"{len(images)} image(s) left in pool {self.cluster.pool}: "
                         f"{', '.join(images[:5])}")
        if trash:
            leaks.append(f"{len(trash)} image(s) still in the trash of pool {self.cluster.pool} "
                         f"after {limit:.0f} s: {', '.join(trash[:5])}")
        return leaks, None

    def node_leaks(self) -> list[str]:
        """Loop devices on files under the work directory (rbd-fuse's images): detached, since
        loop devices are global and would outlive the run."""
        leaks = []
        for device, backing in loops_under(self.workdir):
            leaks.append(f"loop device {device} still attached to {backing}")
            subprocess.run(["losetup", "--detach", device], capture_output=True, check=False,
                           timeout=60)
        return leaks


def loops_under(root: str) -> list[tuple[str, str]]:
    """(device, backing file) of every loop device whose backing file is under `root`."""
    prefix = os.path.realpath(root).rstrip("/") + "/"
    found = []
    for entry in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(entry) as f:
                backing = f.read().rstrip("\n")
        except OSError:
            continue
        if backing.startswith(prefix):
            found.append(("/dev/" + entry.split("/")[3], backing))
    return sorted(found)


def processes_under(root: str) -> list[tuple[int, str]]:
    """(pid, command) of every process but us whose command line names a path under `root`:
    the cluster's daemons (-c ROOT/ceph/ceph.conf), rbd-fuse (its mount point), the driver."""
    prefix = os.path.realpath(root).rstrip("/") + "/"
    found = []
    for entry in glob.glob("/proc/[0-9]*/cmdline"):
        pid = int(entry.split("/")[2])
        if pid == os.getpid():
            continue
        try:
            with open(entry, "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if any(prefix in arg for arg in argv):
            found.append((pid, " ".join(argv)[:160]))
    return found


def end_processes(found: list[tuple[int, str]], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds, each process of this run by its pid."""
    for pid, _ in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p, _ in found):
        time.sleep(0.1)
    for pid, _ in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """No Ctrl-C (or SIGTERM) may cut the cluster's stop short: it would leave daemons running.
    The stop is bounded (tests/ceph/cluster.py: SIGTERM, SIGKILL after 20 s)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def signals_interrupt() -> None:
    """SIGTERM and SIGHUP end the run the way Ctrl-C does, through every cleanup: by default
    they would end Python at once and leave the cluster's daemons behind."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)


@contextlib.contextmanager
def running_cluster(workdir: str) -> Iterator[CephCluster]:
    """A fresh cluster in WORKDIR/ceph, stopped on the way out whatever happened."""
    base = Path(workdir) / "ceph"
    try:
        cluster = start_cluster(base, mgr=True)  # stops what it started if it fails
    except BaseException:
        with _signals_ignored():
            kill_leftovers(base)
        raise
    try:
        yield cluster
    finally:
        with _signals_ignored():
            try:
                cluster.stop()
            finally:
                kill_leftovers(base)
