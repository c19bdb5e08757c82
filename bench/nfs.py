"""--backend nfs: the driver's controller against a real NFS-Ganesha this run starts and stops.

Measures CreateVolume/DeleteVolume (serial and concurrent), and the snapshot copy: one large
file, a tree of small files and a 10 GiB sparse image holding 64 MiB, as the copy's throughput
and as CreateSnapshot-to-ready time.
The node side (mounts) needs a kernel NFS client, which only the UML tests have: their timings
are printed by tests/nfs/test_nfs_node.py.

With --in-guest the controller runs inside a User-Mode Linux guest, where every system call costs
~30 us (20x the host), which is what a copy made of many small RPCs pays for; the same guest then
times csi-driver-nfs's method of snapshotting (tar -czf of the volume over a kernel NFS mount, and
tar -xzf to restore) on the same tree, as the figure to beat.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import yaml

from csi_driver.csi import csi_pb2 as pb
from csi_driver.csi import csi_pb2_grpc as pb_grpc

from .driver import REPO

if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.nfs.guest import Guest, start_guest
from tests.nfs.server import NfsServer, start_server

MiB = 1 << 20


def _cap() -> pb.VolumeCapability:
    return pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(),
        access_mode=pb.VolumeCapability.AccessMode(
            mode=pb.VolumeCapability.AccessMode.MULTI_NODE_MULTI_WRITER))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _timed_many(count: int, concurrency: int, op: Callable[[int], None]) -> dict[str, float]:
    latencies: list[float] = []

    def one(i: int) -> None:
        t = time.perf_counter()
        op(i)
        latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(count)))
    wall = time.perf_counter() - start
    return {"ops": count, "concurrency": concurrency, "ops_per_s": count / wall,
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": _percentile(latencies, 0.99) * 1000}


class NfsBench:
    def __init__(self, server: NfsServer, work: Path, in_guest: bool = False) -> None:
        self.server = server
        config = work / "config.yaml"
        config.write_text(yaml.safe_dump({"backends": {"nfs": {
            "type": "nfs", "server": server.address, "share": "/export", "copyWaitSeconds": 1}}}))
        self.guest: Guest | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        if in_guest:
            self.guest = start_guest(work / "guest", server.netns, [
                "--config", str(config), "--log-level", "WARNING", "--mode", "controller"])
            sock = self.guest.driver_socket
        else:
            sock = work / "csi.sock"
            self.log = open(work / "driver.log", "wb")  # noqa: SIM115 - closed in stop()
            self.proc = subprocess.Popen(
                server.in_netns([sys.executable, "-m", "csi_driver", "--endpoint",
                                 f"unix://{sock}", "--config", str(config), "--log-level",
                                 "WARNING"]),
                stdout=self.log, stderr=subprocess.STDOUT)
        self.channel = grpc.insecure_channel(f"unix://{sock}")
        self.identity = pb_grpc.IdentityStub(self.channel)
        self.controller = pb_grpc.ControllerStub(self.channel)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.identity.Probe(pb.ProbeRequest(), timeout=2)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        self.channel.close()
        if self.guest is not None:
            self.guest.stop()
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(20)
            self.log.close()

    def tar_in_guest(self, label: str, fill: Callable[[Path], int]) -> dict[str, Any]:
        """csi-driver-nfs's snapshot and restore (tar -czf / tar -xzf over a kernel NFS mount,
        client caches dropped first) on a tree like the one `snapshot` copies, in this guest."""
        assert self.guest is not None
        src = self.server.export_dir / f"tar-{label}"
        src.mkdir()
        files = fill(src)
        script = (
            f"set -e; mkdir -p /tmp/tarbench; mount -t nfs -o vers=4.1,hard "
            f"{self.server.address}:/export /tmp/tarbench; cd /tmp/tarbench; "
            "sync; echo 3 > /proc/sys/vm/drop_caches; a=$(date +%s.%N); "
            f"tar -C tar-{label} -czf tar-{label}.tar.gz .; sync; b=$(date +%s.%N); "
            f"mkdir tar-{label}-restored; echo 3 > /proc/sys/vm/drop_caches; "
            f"tar -C tar-{label}-restored -xzf tar-{label}.tar.gz; sync; c=$(date +%s.%N); "
            "cd /; umount /tmp/tarbench; echo $a $b $c")
        done = self.guest.run(["sh", "-c", script], timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"tar in the guest failed: {done.stderr}")
        a, b, c = (float(x) for x in done.stdout.split()[-3:])
        shutil.rmtree(src)
        shutil.rmtree(self.server.export_dir / f"tar-{label}-restored")
        (self.server.export_dir / f"tar-{label}.tar.gz").unlink()
        return {"bytes": files, "snapshot_s": b - a, "restore_s": c - b}

    def create(self, name: str) -> str:
        return str(self.controller.CreateVolume(pb.CreateVolumeRequest(
            name=name, volume_capabilities=[_cap()],
            capacity_range=pb.CapacityRange(required_bytes=MiB)), timeout=60).volume.volume_id)

    def delete(self, volume_id: str) -> None:
        self.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id), timeout=60)

    def create_delete(self, count: int, concurrency: int) -> dict[str, Any]:
        ids: dict[int, str] = {}

        def create(i: int) -> None:
            ids[i] = self.create(f"pvc-bench-{concurrency}-{i}")

        made = _timed_many(count, concurrency, create)
        gone = _timed_many(count, concurrency, lambda i: self.delete(ids[i]))
        return {"create": made, "delete": gone}

    def snapshot(self, label: str, fill: Callable[[Path], int]) -> dict[str, Any]:
        """Time from the first CreateSnapshot to ready_to_use, and a restore from it."""
        vol = self.create(f"pvc-snap-{label}")
        payload = fill(self.server.export_dir / f"pvc-snap-{label}")
        request = pb.CreateSnapshotRequest(name=f"snap-{label}", source_volume_id=vol)
        start = time.perf_counter()
        while not (snap := self.controller.CreateSnapshot(request, timeout=60).snapshot
                   ).ready_to_use:
            time.sleep(0.05)
        took = time.perf_counter() - start
        restore = pb.CreateVolumeRequest(
            name=f"pvc-restore-{label}", volume_capabilities=[_cap()],
            volume_content_source=pb.VolumeContentSource(
                snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)))
        start = time.perf_counter()
        while True:
            try:
                restored = self.controller.CreateVolume(restore, timeout=60).volume.volume_id
                break
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.ABORTED:
                    raise
                time.sleep(0.05)
        restore_s = time.perf_counter() - start
        self.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
        self.delete(restored)
        self.delete(vol)
        return {"bytes": payload, "snapshot_s": took, "snapshot_mb_s": payload / took / 1e6,
                "restore_s": restore_s, "restore_mb_s": payload / restore_s / 1e6}


def _big_file(size_mib: int) -> Callable[[Path], int]:
    def fill(root: Path) -> int:
        block = os.urandom(MiB)
        with open(root / "big", "wb") as f:
            for _ in range(size_mib):
                f.write(block)
        return size_mib * MiB
    return fill


def _small_files(count: int, size: int) -> Callable[[Path], int]:
    def fill(root: Path) -> int:
        data = os.urandom(size)
        for d in range(count // 100):
            sub = root / f"d{d}"
            sub.mkdir()
            for f in range(100):
                (sub / f"f{f}").write_bytes(data)
        return count * size
    return fill


def _sparse_image(size_gib: int, data_mib: int) -> Callable[[Path], int]:
    """A sparse image file of `size_gib` holding `data_mib` MiB spread through it (as a
    filesystem image mostly empty): the copy must read it all to find the holes."""
    def fill(root: Path) -> int:
        size = size_gib << 30
        with open(root / "disk.img", "wb") as f:
            f.truncate(size)
            for i in range(data_mib):
                f.seek(i * (size // data_mib))
                f.write(os.urandom(MiB))
        return data_mib * MiB
    return fill


def main_nfs(args: argparse.Namespace) -> int:
    quick, in_guest = bool(args.quick), bool(args.in_guest)
    small = 1000 if quick else 10000
    work = Path(tempfile.mkdtemp(prefix="berth-bench-nfs-"))
    server = start_server(work / "server", f"berth-bench-{os.getpid()}")
    results: dict[str, Any] = {"backend": "nfs", "in_guest": in_guest,
                               "when": time.strftime("%FT%TZ", time.gmtime())}
    try:
        bench = NfsBench(server, work, in_guest)
        try:
            if not in_guest:
                n = 100 if quick else 400
                results["create_delete_c1"] = bench.create_delete(n, 1)
                results["create_delete_c16"] = bench.create_delete(n, 16)
                results["snapshot_1file"] = bench.snapshot(
                    "big", _big_file(128 if quick else 1024))
            results["snapshot_small_files"] = bench.snapshot("small", _small_files(small, 4096))
            results["snapshot_small_files"]["files"] = small
            if in_guest:
                results["tar_small_files"] = bench.tar_in_guest("small",
                                                                _small_files(small, 4096))
                results["tar_small_files"]["files"] = small
            else:
                results["snapshot_sparse_image"] = bench.snapshot("sparse", _sparse_image(10, 64))
        finally:
            bench.stop()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    out = args.out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    for key in ("create_delete_c1", "create_delete_c16"):
        for op in ("create", "delete"):
            if key not in results:
                continue
            r = results[key][op]
            print(f"{op:6} C={r['concurrency']:<2} {r['ops_per_s']:7.1f} ops/s  "
                  f"p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms")
    for key in ("snapshot_1file", "snapshot_small_files", "snapshot_sparse_image",
                "tar_small_files"):
        if key not in results:
            continue
        r = results[key]
        line = (f"{key:21} {r['bytes'] / MiB:7.0f} MiB  snapshot {r['snapshot_s']:6.2f} s  "
                f"restore {r['restore_s']:6.2f} s")
        if "files" in r:
            line += (f"  ({r['files'] / r['snapshot_s']:6.0f} / "
                     f"{r['files'] / r['restore_s']:6.0f} files/s)")
        else:
            line += (f"  ({r['bytes'] / r['snapshot_s'] / 1e6:6.1f} / "
                     f"{r['bytes'] / r['restore_s'] / 1e6:6.1f} MB/s)")
        print(line)
    print(f"results: {out}")
    return 0
