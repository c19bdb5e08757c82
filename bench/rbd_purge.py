"""How fast the RBD backend's trash purger empties the trash, and what the image features cost
CreateVolume, on a throw-away single-node Ceph (tests/ceph/cluster.py).

    sudo .venv/bin/python -m bench.rbd_purge [--images 20] [--gib 10] [--creates 200]
                                             [--features layering ...] [--driver-src DIR]

For each feature set (`--features`, default: layering, and layering + exclusive-lock,
object-map, fast-diff), passed as the StorageClass parameter `imageFeatures`:
  create   CreateVolume of `--creates` 64 MiB volumes at C=16, then DeleteVolume of each at C=16
           (delete_ops_per_s), then the trash is left to empty
  purge    `--images` empty volumes of `--gib` GiB are made, then deleted at C=4; from the first
           DeleteVolume until `rbd trash ls` is empty: images/s purged
Prints a table and writes bench/results/rbd-purge.json (`--out`). `--driver-src` runs another
checkout's csi_driver (a baseline: `git archive REV csi_driver | tar -x -C /tmp/base`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

from csi_driver.csi import csi_pb2 as pb

from . import driver as driver_mod
from .csi import Csi, RpcFailure, mount_cap
from .measure import run_pool
from .rbd import BACKEND, CephCluster, RbdRun, end_processes, processes_under, running_cluster

MiB, GiB = 1 << 20, 1 << 30
FULL = "layering,exclusive-lock,object-map,fast-diff"
DEFAULT_OUT = os.path.join(driver_mod.REPO, "bench", "results", "rbd-purge.json")


def _trash_count(cluster: CephCluster) -> int:
    return len(json.loads(cluster.rbd("trash", "ls", "--format", "json", cluster.pool,
                                      timeout=30) or "[]"))


def _wait_empty(cluster: CephCluster, limit: float) -> float | None:
    """Seconds until the trash is empty (polled every 0.1 s), None past `limit`."""
    t0 = time.monotonic()
    while _trash_count(cluster):
        if time.monotonic() - t0 > limit:
            return None
        time.sleep(0.1)
    return time.monotonic() - t0


class Bench:
    def __init__(self, csi: Csi, run: RbdRun) -> None:
        self.csi, self.run = csi, run

    def create(self, name: str, size: int, features: str) -> str:
        request = pb.CreateVolumeRequest(
            name=name, capacity_range=pb.CapacityRange(required_bytes=size),
            volume_capabilities=[mount_cap()], parameters={"imageFeatures": features},
            secrets=self.run.secrets)
        return str(self.csi.create_volume(request, 60).volume.volume_id)

    def delete_all(self, ids: list[str], concurrency: int) -> float:
        """DeleteVolume of each at `concurrency`; ops/s."""
        row = run_pool("delete", concurrency, len(ids), lambda i: self.csi.delete_volume(
            pb.DeleteVolumeRequest(volume_id=ids[i], secrets=self.run.secrets), 60))
        return len(row.latencies_ms) / row.wall_s if row.wall_s else 0.0

    def creates(self, features: str, count: int, tag: str) -> dict[str, Any]:
        ids: list[str] = [""] * count

        def op(i: int) -> None:
            ids[i] = self.create(f"c-{tag}-{i}", 64 * MiB, features)

        row = run_pool("create", 16, count, op)
        deletes = self.delete_all([i for i in ids if i], 16)
        _wait_empty(self.run.cluster, 300)
        lat = sorted(row.latencies_ms)
        return {"ops_per_s": round(len(lat) / row.wall_s, 1), "errors": sum(row.errors.values()),
                "delete_ops_per_s": round(deletes, 1),
                "p50_ms": round(lat[len(lat) // 2], 1) if lat else None,
                "p99_ms": round(lat[int(len(lat) * 0.99)], 1) if lat else None}

    def purge(self, features: str, count: int, gib: int, tag: str) -> dict[str, Any]:
        ids = [self.create(f"p-{tag}-{i}", gib * GiB, features) for i in range(count)]
        t0 = time.monotonic()
        self.delete_all(ids, 4)
        deletes_s = time.monotonic() - t0
        waited = _wait_empty(self.run.cluster, 900)
        if waited is None:
            return {"images": count, "error": "trash not empty after 900 s"}
        total = time.monotonic() - t0
        return {"images": count, "gib": gib, "seconds": round(total, 2),
                "deletes_s": round(deletes_s, 2), "images_per_s": round(count / total, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rbd_purge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--gib", type=int, default=10)
    parser.add_argument("--creates", type=int, default=200, help="0: skip the create row")
    parser.add_argument("--features", nargs="+", default=["layering", FULL])
    parser.add_argument("--driver-src", default=driver_mod.REPO)
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.rbd_purge: run as root (the cluster's OSD, like bench/run)", file=sys.stderr)
        return 2

    workdir = tempfile.mkdtemp(prefix="berth-purge-")
    results: dict[str, Any] = {"driver_src": args.driver_src, "rows": {}}
    try:
        with running_cluster(workdir) as cluster:
            run = RbdRun(cluster, workdir)
            backends = {BACKEND: run.backends()[BACKEND]}
            proc = driver_mod.start(workdir, "", args.driver_src, backends)
            csi = Csi(proc.socket_path)
            bench = Bench(csi, run)
            try:
                for n, features in enumerate(args.features):
                    row: dict[str, Any] = {}
                    if args.creates:
                        row["create_c16"] = bench.creates(features, args.creates, str(n))
                    row["purge"] = bench.purge(features, args.images, args.gib, str(n))
                    results["rows"][features] = row
                    print(f"{features:45} {json.dumps(row)}", flush=True)
            except RpcFailure as exc:
                results["error"] = str(exc)
                print(f"failed: {exc}", file=sys.stderr)
            finally:
                csi.close()
                proc.stop()
    finally:
        end_processes(processes_under(workdir))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"written to {args.out}")
    return 1 if "error" in results else 0


if __name__ == "__main__":
    sys.exit(main())
