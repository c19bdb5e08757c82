"""A CephFS on the session's test cluster: one MDS, one filesystem, one subvolume group.

Added on demand to a running CephCluster (which must have its mgr: the volumes module lives
there). Settings from what we measured on these machines: `mds tick interval = 0.2` makes an
asynchronous clone finish in well under a second (the 5 s default makes each clone-status
call block for seconds); the MDS cache is held to 128 MiB.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from .cluster import CephCluster, CephError

MDS_ID = "a"
FS_NAME = "cephfs"
GROUP = "csi"
FS_USER = "csifs"


@dataclass
class Filesystem:
    cluster: CephCluster
    name: str = FS_NAME
    group: str = GROUP
    #: A user with the caps ceph-csi documents for its CephFS provisioner and node plugin.
    user: str = FS_USER
    key: str = ""
    mds: str = f"mds.{MDS_ID}"

    @property
    def data_pool(self) -> str:
        return f"cephfs.{self.name}.data"

    def subvolumes(self) -> list[str]:
        return sorted(s["name"] for s in self.cluster.ceph_json(
            "fs", "subvolume", "ls", self.name, "--group_name", self.group))

    def snapshots(self, subvolume: str) -> list[str]:
        return sorted(s["name"] for s in self.cluster.ceph_json(
            "fs", "subvolume", "snapshot", "ls", self.name, subvolume,
            "--group_name", self.group))

    def info(self, subvolume: str) -> dict[str, object]:
        return dict(self.cluster.ceph_json("fs", "subvolume", "info", self.name, subvolume,
                                           "--group_name", self.group))

    def getxattr(self, path: str, name: str) -> str:
        """An attribute of `path` in the filesystem, read as client.admin through libcephfs,
        in a child process with a timeout (a call to a stalled MDS blocks)."""
        script = (
            "import sys, cephfs\n"
            "fs = cephfs.LibCephFS(conffile=sys.argv[1], auth_id='admin',"
            " conf={'keyring': sys.argv[2], 'client_mount_timeout': '10'})\n"
            "fs.mount(filesystem_name=sys.argv[3].encode())\n"
            "print(fs.getxattr(sys.argv[4].encode(), sys.argv[5]).decode())\n"
            "fs.shutdown()\n")
        done = subprocess.run(
            [sys.executable, "-c", script, str(self.cluster.conf),
             str(self.cluster.admin_keyring), self.name, path, name],
            capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            raise CephError(f"getxattr {path} {name}: {done.stderr.strip()[-500:]}")
        return done.stdout.strip()

    def evict_client_of(self, pid: int) -> int:
        """Evict the MDS sessions of the (dead) ceph-fuse process `pid`, as an operator does
        (`ceph tell mds.X client evict`), or the MDS itself after session_autoclose (300 s):
        until then its caps stay held and operations that need them wait. How many."""
        out = self.cluster.ceph("tell", self.mds, "session", "ls", "--format", "json")
        ids = [str(e["id"]) for e in json.loads(out)
               if str(e.get("client_metadata", {}).get("pid", "")) == str(pid)]
        for client in ids:
            self.cluster.ceph("tell", self.mds, "client", "evict", f"id={client}")
        return len(ids)

    def pause_mds(self) -> None:
        """SIGSTOP the MDS: it stops answering, as a hung or unreachable one does."""
        os.kill(self.cluster._daemons[self.mds].pid, signal.SIGSTOP)

    def resume_mds(self, timeout: float = 120) -> None:
        """SIGCONT it, then wait until the mgr's volumes module answers again."""
        os.kill(self.cluster._daemons[self.mds].pid, signal.SIGCONT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.subvolumes()
                return
            except CephError:
                if time.monotonic() > deadline:
                    raise

    def start_mds(self, timeout: float = 60, wait: bool = True) -> None:
        conf = str(self.cluster.conf)
        self.cluster._spawn(self.mds, ["ceph-mds", "-c", conf, "-i", MDS_ID, "-f"])
        if wait:
            _wait_active(self.cluster, self.name, timeout)


def _wait_active(cluster: CephCluster, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            dump = cluster.ceph_json("fs", "dump", timeout=10)
            for fs in dump.get("filesystems", []):
                if fs["mdsmap"]["fs_name"] == name and any(
                        i["state"] == "up:active" for i in fs["mdsmap"]["info"].values()):
                    return
        except CephError:
            pass
        time.sleep(0.2)
    raise CephError(f"no active MDS for {name} within {timeout:.0f} s\n{cluster.log_tail()}")


def add_filesystem(cluster: CephCluster, timeout: float = 90) -> Filesystem:
    """Start mds.a, create filesystem `cephfs` (pools cephfs.cephfs.meta/.data) and group `csi`,
    and a user with ceph-csi's CephFS caps. Seconds per step go to cluster.timings."""
    if not cluster.mgr:
        raise CephError("CephFS needs the cluster's mgr (the volumes module runs there)")
    t0 = time.monotonic()
    base = cluster.base
    mds_dir = base / f"mds/ceph-{MDS_ID}"
    mds_dir.mkdir(parents=True, exist_ok=True)
    with cluster.conf.open("a") as f:
        f.write(f"""
[mds]
mds data = {base}/mds/$cluster-$id
keyring = {base}/mds/$cluster-$id/keyring
log file = {base}/log/$cluster-$name.log
mds cache memory limit = 134217728
mds tick interval = 0.2
""")
    cluster.ceph("auth", "get-or-create", f"mds.{MDS_ID}", "mon", "allow profile mds",
                 "osd", "allow rwx", "mds", "allow *", "mgr", "allow profile mds",
                 "-o", str(mds_dir / "keyring"))
    fs = Filesystem(cluster)
    fs.start_mds(wait=False)
    deadline = time.monotonic() + timeout
    while True:  # the mgr's volumes module may not answer yet
        try:
            cluster.ceph("fs", "volume", "create", fs.name, timeout=30)
            break
        except CephError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    _wait_active(cluster, fs.name, timeout)
    cluster.ceph("fs", "subvolumegroup", "create", fs.name, fs.group)
    # The caps ceph-csi documents for a CephFS provisioner + node plugin user.
    cluster.ceph("auth", "get-or-create", f"client.{fs.user}", "mgr", "allow rw",
                 "mon", "allow r", "mds", f"allow rw fsname={fs.name}",
                 "osd", f"allow rw tag cephfs metadata={fs.name}, "
                        f"allow rw tag cephfs data={fs.name}")
    fs.key = cluster.ceph("auth", "print-key", f"client.{fs.user}").strip()
    cluster.timings["cephfs"] = round(time.monotonic() - t0, 3)
    return fs


def mounted_by(path: str) -> str | None:
    """The FUSE/ceph source mounted at `path`, if any (from the mount table)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == os.path.realpath(path):
                sep = fields.index("-")
                return fields[sep + 1]
    return None

