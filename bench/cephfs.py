"""The CephFS backend beside the mgr volumes module it drives and beside ceph-csi's figures:
CreateVolume/DeleteVolume ops/s at concurrency 1 and 16, CreateSnapshot, the time until a
restore or a clone is ready, a clone of 1 GiB in 1,000 files, NodeStage with ceph-fuse,
start-up and RSS.

    sudo .venv/bin/python -m bench.cephfs [--out bench/results/cephfs-latest.json] [-n 48]

Starts what the tests start (tests/ceph: a single-node Ceph with its mgr, plus an MDS and the
filesystem `cephfs` with mds tick 0.2 s), a driver with the CephFS backend (ceph-fuse), and
stops them all at the end. "mgr direct" is the same volumes-module command sent straight
through librados on one connection: the floor any driver using the module stands on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .driver import REPO, status_kib

if REPO not in sys.path:  # the harness lives in tests/
    sys.path.insert(0, REPO)

import grpc

from csi_driver.csi import csi_pb2 as pb
from csi_driver.csi import csi_pb2_grpc as pb_grpc
from tests.ceph.cluster import start_cluster
from tests.ceph.filesystem import Filesystem, add_filesystem
from tests.harness import Driver, GiB, mount_cap, start_driver, write_config

from .measure import Measurement, percentile, run_pool

Mode = pb.VolumeCapability.AccessMode.Mode
CAP = mount_cap(Mode.MULTI_NODE_MULTI_WRITER)
Src = pb.VolumeContentSource
# ceph-csi's CephFS controller measured here on the same kind of cluster (from the issue).
CEPH_CSI = {"create_ops_s": {1: 34, 16: 42}, "create_p50_ms": {1: 28, 16: 377},
            "delete_ops_s": {1: 40, 16: 59}, "snapshot_p50_ms": 40,
            "restore_ready_s": 0.6, "clone_ready_s": 0.4, "startup_ms": 81,
            "rss_idle_mb": 72, "rss_peak_mb": 96}


def _row(m: Measurement) -> dict[str, Any]:
    lat = sorted(m.latencies_ms)
    return {"scenario": m.scenario, "concurrency": m.concurrency, "ops": len(lat),
            "ops_per_s": round(len(lat) / m.wall_s, 1) if m.wall_s and lat else None,
            "p50_ms": round(percentile(lat, 50), 1) if lat else None,
            "p95_ms": round(percentile(lat, 95), 1) if lat else None,
            "errors": dict(m.errors)}


class Direct:
    """Volumes-module commands straight through librados, as client.csifs."""

    def __init__(self, fs: Filesystem) -> None:
        import rados

        self.fs = fs
        self.rados = rados.Rados(rados_id=fs.user, conf={
            "mon_host": fs.cluster.monitors, "key": fs.key, "keyring": "",
            "client_mount_timeout": "10"})
        self.rados.connect()

    def cmd(self, prefix: str, **args: Any) -> bytes:
        command = {"prefix": prefix, "vol_name": self.fs.name, "group_name": self.fs.group,
                   "format": "json", **args}
        ret, out, status = self.rados.mgr_command(json.dumps(command), b"")
        if ret != 0:
            raise RuntimeError(f"{prefix}: {status}")
        return bytes(out)

    def clone_ready_s(self, sub: str, snap: str, target: str) -> float:
        t0 = time.perf_counter()
        self.cmd("fs subvolume snapshot clone", sub_name=sub, snap_name=snap,
                 target_sub_name=target, target_group_name=self.fs.group)
        while json.loads(self.cmd("fs clone status", clone_name=target))[
                "status"]["state"] != "complete":
            time.sleep(0.02)
        return time.perf_counter() - t0


def _create(d: Driver, secrets: dict[str, str], name: str, source: Src | None = None,
            size: int = GiB) -> pb.Volume:
    req = pb.CreateVolumeRequest(name=name, capacity_range=pb.CapacityRange(
        required_bytes=size), volume_capabilities=[CAP], secrets=secrets)
    if source is not None:
        req.volume_content_source.CopyFrom(source)
    return d.controller.CreateVolume(req, timeout=120).volume


def _ready_s(call: Callable[[], object]) -> float:
    """Seconds until `call` stops answering ABORTED (the provisioner's retry, every 20 ms)."""
    t0 = time.perf_counter()
    while True:
        try:
            call()
            return time.perf_counter() - t0
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ABORTED:
                raise
            time.sleep(0.02)


def _startup_ms(config: Path, work: Path) -> float:
    """Process start until GetPluginInfo answers, polling the socket every 5 ms (a gRPC
    channel's reconnect back-off would add up to a second)."""
    sock = work / "startup.sock"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "csi_driver", "--endpoint", f"unix://{sock}",
                             "--config", str(config), "--kubelet-dir", str(work)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if sock.exists():
                with grpc.insecure_channel(f"unix://{sock}") as channel:
                    stub = pb_grpc.IdentityStub(channel)  # type: ignore[no-untyped-call]
                    stub.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=5,
                                       wait_for_ready=True)
                return (time.perf_counter() - t0) * 1000
            time.sleep(0.005)
    finally:
        proc.terminate()
        proc.wait(30)


def run(fs: Filesystem, work: Path, n: int) -> dict[str, Any]:
    keyfile = work / "csifs.key"
    keyfile.write_text(fs.key)
    config = write_config(work / "c.yaml", {"fs": {
        "type": "cephfs", "monitors": [fs.cluster.monitors], "fsName": fs.name,
        "subvolumeGroup": fs.group, "mounter": "fuse", "nodeStateDir": str(work / "node"),
        "userID": fs.user, "userKeyFile": str(keyfile), "timeoutSeconds": 10}})
    secrets = {"userID": fs.user, "userKey": fs.key}
    startup_ms = sorted(_startup_ms(config, work) for _ in range(3))[1]
    d = start_driver(work, config, "--kubelet-dir", str(work))
    rss_idle = status_kib(d.proc.pid, "VmRSS") or 0
    direct = Direct(fs)
    rows: list[dict[str, Any]] = []
    out: dict[str, Any] = {"rows": rows, "ceph_csi": CEPH_CSI}
    try:
        _create(d, secrets, "warm-up")  # first use: connection, group, pools
        for c, count in ((1, max(n // 2, 8)), (16, n)):
            names = [f"direct-{c}-{i}" for i in range(count)]
            rows.append(_row(run_pool("mgr direct create", c, count, lambda i, n=names: (
                direct.cmd("fs subvolume create", sub_name=n[i], size=GiB)))))
            rows.append(_row(run_pool("mgr direct rm", c, count, lambda i, n=names: (
                direct.cmd("fs subvolume rm", sub_name=n[i])))))
            vols: dict[int, pb.Volume] = {}

            def create(i: int, c: int = c, vols: dict[int, pb.Volume] = vols) -> None:
                vols[i] = _create(d, secrets, f"bench-{c}-{i}")

            rows.append(_row(run_pool("CreateVolume", c, count, create)))
            rows.append(_row(run_pool("DeleteVolume", c, count, lambda i, v=vols: (
                d.controller.DeleteVolume(pb.DeleteVolumeRequest(
                    volume_id=v[i].volume_id, secrets=secrets), timeout=120)))))

        src = _create(d, secrets, "bench-src")
        snaps: dict[int, pb.Snapshot] = {}

        def snap(i: int) -> None:
            snaps[i] = d.controller.CreateSnapshot(pb.CreateSnapshotRequest(
                name=f"bench-snap-{i}", source_volume_id=src.volume_id, secrets=secrets),
                timeout=60).snapshot

        rows.append(_row(run_pool("CreateSnapshot", 1, 20, snap)))
        rows.append(_row(run_pool("mgr direct snapshot", 1, 20, lambda i: direct.cmd(
            "fs subvolume snapshot create", sub_name="csi-vol-" + src.volume_id.split(":")[1],
            snap_name=f"direct-snap-{i}"))))
        restore = [_ready_s(lambda i=i: _create(d, secrets, f"bench-restore-{i}", Src(
            snapshot=Src.SnapshotSource(snapshot_id=snaps[i].snapshot_id)))) for i in range(5)]
        clone = [_ready_s(lambda i=i: _create(d, secrets, f"bench-clone-{i}", Src(
            volume=Src.VolumeSource(volume_id=src.volume_id)))) for i in range(5)]
        src_sub = "csi-vol-" + src.volume_id.split(":")[1]
        own = [direct.clone_ready_s(src_sub, f"direct-snap-{i}", f"direct-clone-{i}")
               for i in range(5)]
        out["restore_ready_s_p50"] = round(sorted(restore)[2], 3)
        out["clone_ready_s_p50"] = round(sorted(clone)[2], 3)
        out["mgr_clone_ready_s_p50"] = round(sorted(own)[2], 3)

        # NodeStage with ceph-fuse, and a clone of 1 GiB in 1,000 files.
        stage_ms = []
        for i in range(10):
            staging = work / f"stage-{i}"
            staging.mkdir()
            t1 = time.perf_counter()
            d.node.NodeStageVolume(pb.NodeStageVolumeRequest(
                volume_id=src.volume_id, staging_target_path=str(staging),
                volume_capability=CAP, volume_context=src.volume_context, secrets=secrets),
                timeout=60)
            stage_ms.append((time.perf_counter() - t1) * 1000)
            if i < 9:
                d.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
                    volume_id=src.volume_id, staging_target_path=str(staging)), timeout=60)
        out["node_stage_ms_p50"] = round(sorted(stage_ms)[5], 1)
        filled = work / "stage-9"
        subprocess.run(["timeout", "-s", "KILL", "300", "sh", "-c",
                        f"for i in $(seq 1 1000); do head -c 1048576 /dev/urandom > "
                        f"{filled}/f$i; done; sync"], check=True)
        d.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
            volume_id=src.volume_id, staging_target_path=str(filled)), timeout=60)
        out["clone_1gib_1000_files_s"] = round(_ready_s(lambda: _create(
            d, secrets, "bench-big-clone", Src(volume=Src.VolumeSource(
                volume_id=src.volume_id)))), 2)
    finally:
        out["startup_ms"] = round(startup_ms)
        out["rss_idle_mb"] = round(rss_idle / 1024, 1)
        out["rss_peak_mb"] = round((status_kib(d.proc.pid, "VmHWM") or 0) / 1024, 1)
        d.stop()
        direct.rados.shutdown()
    return out


def render(result: dict[str, Any]) -> str:
    lines = [f"{'scenario':<22}{'C':>4}{'ops':>6}{'ops/s':>8}{'p50 ms':>9}{'p95 ms':>9}  errors"]
    for r in result["rows"]:
        lines.append(f"{r['scenario']:<22}{r['concurrency']:>4}{r['ops']:>6}"
                     f"{r['ops_per_s'] or '-':>8}{r['p50_ms'] or '-':>9}{r['p95_ms'] or '-':>9}"
                     f"  {r['errors'] or ''}")
    for key in ("restore_ready_s_p50", "clone_ready_s_p50", "mgr_clone_ready_s_p50",
                "node_stage_ms_p50", "clone_1gib_1000_files_s", "startup_ms", "rss_idle_mb",
                "rss_peak_mb"):
        lines.append(f"{key}: {result.get(key)}")
    lines.append(f"ceph-csi (measured here earlier): {result['ceph_csi']}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cephfs", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "cephfs-latest.json"))
    p.add_argument("-n", type=int, default=48, help="operations per concurrency-16 phase")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="berth-bench-cephfs-"))
    cluster = start_cluster(work / "ceph", mgr=True)
    try:
        result = run(add_filesystem(cluster), work, args.n)
    finally:
        subprocess.run(["sh", "-c", f"grep -o ' {work}/[^ ]*' /proc/self/mountinfo | "
                                    "xargs -r -n1 umount -l"], check=False)
        subprocess.run(["pkill", "-KILL", "-f", f"ceph-fuse .*{work}"], check=False)
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    result["meta"] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "n": args.n}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(render(result))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
