"""Changed block tracking: how long the SnapshotMetadata service takes to stream the delta
between two snapshots of a 10 GiB block volume with 100 MiB written between them, and how many
bytes were read from storage to compute it (hostPath: the driver's /proc/PID/io read_bytes,
page cache dropped first; RBD: the OSD's op_r_out_bytes), beside the Go hostPath driver's
method: read both snapshots whole and compare them block by block (done here in-process).

    sudo .venv/bin/python -m bench.cbt [--backend hostpath|rbd] [--fs xfs|btrfs|ext4]
        [--gib 10] [--delta-mib 100] [--base-mib 1024] [--runs 5]
        [--out bench/results/cbt-{hostpath-<fs>,rbd}-latest.json]

The volume is written through its own loop device, as a pod would: `--base-mib` in 1 MiB pieces
before the first snapshot, then `--delta-mib` in 256 KiB pieces at random 4 KiB-aligned offsets.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .driver import REPO

if REPO not in sys.path:  # the harness lives in tests/
    sys.path.insert(0, REPO)

from csi_driver.csi import csi_pb2 as pb
from tests.harness import Driver, block_cap, start_driver, write_config

from .fs import loop_filesystem

MiB, GiB = 1 << 20, 1 << 30
PIECE = 256 * 1024


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def read_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return int(next(line for line in f if line.startswith("read_bytes:")).split()[1])


def own_read_bytes() -> int:
    return read_bytes(os.getpid())


def write_pieces(device: str, offsets: list[int], length: int, rng: random.Random) -> None:
    fd = os.open(device, os.O_WRONLY)
    try:
        for offset in offsets:
            os.pwrite(fd, rng.randbytes(length), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def stream_delta(d: Driver, base: str, target: str) -> tuple[int, int]:
    """(ranges, bytes reported) of the whole delta stream."""
    ranges = changed = 0
    for r in d.metadata.GetMetadataDelta(pb.GetMetadataDeltaRequest(
            base_snapshot_id=base, target_snapshot_id=target)):
        ranges += len(r.block_metadata)
        changed += sum(m.size_bytes for m in r.block_metadata)
    return ranges, changed


def stream_allocated(d: Driver, snap: str) -> tuple[int, int]:
    ranges = total = 0
    for r in d.metadata.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(snapshot_id=snap)):
        ranges += len(r.block_metadata)
        total += sum(m.size_bytes for m in r.block_metadata)
    return ranges, total


def compare_whole(base: str, target: str, size: int) -> int:
    """The Go hostPath driver's method: both snapshots read whole, compared 4 KiB at a time;
    returns the changed bytes."""
    changed = 0
    with open(base, "rb") as a, open(target, "rb") as b:
        for _ in range(0, size, MiB):
            x, y = a.read(MiB), b.read(MiB)
            if x != y:
                changed += sum(4096 for k in range(0, len(x), 4096)
                               if x[k:k + 4096] != y[k:k + 4096])
    return changed


def timed(runs: int, fn: Callable[[], Any], reads: Callable[[], int]
          ) -> dict[str, Any]:
    seconds, read = [], []
    result: Any = None
    for _ in range(runs):
        drop_caches()
        before, start = reads(), time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
        read.append(reads() - before)
    return {"seconds_p50": statistics.median(seconds), "seconds_min": min(seconds),
            "read_bytes_p50": int(statistics.median(read)), "result": result}


def hostpath(args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    size = args.gib * GiB
    with tempfile.TemporaryDirectory(prefix="bench-cbt-") as tmp, \
            loop_filesystem(args.fs, tmp, args.gib * 2 + 4) as mnt:
        work = Path(tmp)
        d = start_driver(work, write_config(work / "c.yaml", {"local": {
            "type": "hostpath", "path": os.path.join(mnt, "berth")}}),
            env={"BERTH_KUBELET_DIR": os.path.realpath(tmp)})
        try:
            vid = d.controller.CreateVolume(pb.CreateVolumeRequest(
                name="cbt", capacity_range=pb.CapacityRange(required_bytes=size),
                volume_capabilities=[block_cap()])).volume.volume_id
            staging = work / "staging"
            staging.mkdir()
            d.node.NodeStageVolume(pb.NodeStageVolumeRequest(
                volume_id=vid, staging_target_path=str(staging),
                volume_capability=block_cap()))
            device = str(staging / "device")
            try:
                t0 = time.perf_counter()
                s1, s2 = two_snapshots(d, vid, args, rng, lambda offsets, length: write_pieces(
                    device, offsets, length, rng))
                setup_s = time.perf_counter() - t0
            finally:
                d.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
                    volume_id=vid, staging_target_path=str(staging)))
            pid = d.proc.pid
            ours = timed(args.runs, lambda: stream_delta(d, s1, s2), lambda: read_bytes(pid))
            alloc = timed(args.runs, lambda: stream_allocated(d, s2), lambda: read_bytes(pid))
            snaps = os.path.join(mnt, "berth", "snapshots")
            files = [os.path.join(snaps, s.split(":", 1)[1], "disk.img") for s in (s1, s2)]
            whole = timed(1, lambda: compare_whole(files[0], files[1], size), own_read_bytes)
        finally:
            assert d.stop() == 0
    return report(args, size, setup_s, ours, alloc, whole)


def two_snapshots(d: Driver, vid: str, args: argparse.Namespace, rng: random.Random,
                  write: Callable[[list[int], int], None], secrets: dict[str, str] | None = None
                  ) -> tuple[str, str]:
    """The base data, the first snapshot, the pieces written between, the second snapshot."""
    size = args.gib * GiB
    base = rng.sample(range(size // MiB), args.base_mib)
    write([b * MiB for b in sorted(base)], MiB)
    s1 = d.controller.CreateSnapshot(pb.CreateSnapshotRequest(
        name="cbt-1", source_volume_id=vid, secrets=secrets)).snapshot.snapshot_id
    pieces = args.delta_mib * MiB // PIECE
    write([o * 4096 for o in rng.sample(range((size - PIECE) // 4096), pieces)], PIECE)
    s2 = d.controller.CreateSnapshot(pb.CreateSnapshotRequest(
        name="cbt-2", source_volume_id=vid, secrets=secrets)).snapshot.snapshot_id
    return s1, s2


def report(args: argparse.Namespace, size: int, setup_s: float, ours: dict[str, Any],
           alloc: dict[str, Any], whole: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "backend": args.backend, "fs": args.fs if args.backend == "hostpath" else "",
        "volume_bytes": size, "written_between_bytes": args.delta_mib * MiB,
        "base_bytes": args.base_mib * MiB, "setup_s": round(setup_s, 1),
        "delta": {"seconds_p50": round(ours["seconds_p50"], 4),
                  "seconds_min": round(ours["seconds_min"], 4),
                  "read_bytes_p50": ours["read_bytes_p50"],
                  "read_percent_of_volume": round(100 * ours["read_bytes_p50"] / size, 4),
                  "ranges": ours["result"][0], "reported_bytes": ours["result"][1]},
        "allocated": {"seconds_p50": round(alloc["seconds_p50"], 4),
                      "read_bytes_p50": alloc["read_bytes_p50"],
                      "ranges": alloc["result"][0], "reported_bytes": alloc["result"][1]},
        "read_both_and_compare": {"seconds": round(whole["seconds_p50"], 2),
                                  "read_bytes": whole["read_bytes_p50"],
                                  "changed_bytes": whole["result"]},
        **extra,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def rbd(args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    """The same against a single-node Ceph (tests/ceph), bytes read being the OSD's own
    (op_r_out_bytes), with librbd's diff straight from this process (exact, and whole
    objects from the object map) as the floor."""
    import rados
    import rbd as librbd

    from tests.ceph.cluster import start_cluster

    size = args.gib * GiB
    work = Path(tempfile.mkdtemp(prefix="bench-cbt-rbd-"))
    cluster = start_cluster(work / "ceph", osd_size_gib=args.gib * 2 + 6)

    def osd_read() -> int:
        perf = cluster.ceph_json("tell", "osd.0", "perf", "dump")
        return int(perf["osd"]["op_r_out_bytes"])

    try:
        keyfile = work / "csi.key"
        keyfile.write_text(cluster.csi_key)
        d = start_driver(work, write_config(work / "c.yaml", {"ceph": {
            "type": "rbd", "pool": cluster.pool, "monitors": [cluster.monitors],
            "userID": cluster.csi_user, "userKeyFile": str(keyfile), "timeoutSeconds": 30}}))
        conn = rados.Rados(rados_id="admin", conf=cluster.client_conf(cluster.admin_key()))
        conn.connect()
        ctx = conn.open_ioctx(cluster.pool)
        try:
            vid = d.controller.CreateVolume(pb.CreateVolumeRequest(
                name="cbt", capacity_range=pb.CapacityRange(required_bytes=size),
                volume_capabilities=[block_cap()])).volume.volume_id
            image = "csi-vol-" + vid.split(":", 1)[1]

            def write(offsets: list[int], length: int) -> None:
                with librbd.Image(ctx, image) as img:
                    for offset in offsets:
                        img.write(rng.randbytes(length), offset)
                    img.flush()

            t0 = time.perf_counter()
            s1, s2 = two_snapshots(d, vid, args, rng, write)
            setup_s = time.perf_counter() - t0
            ours = timed(args.runs, lambda: stream_delta(d, s1, s2), osd_read)
            alloc = timed(args.runs, lambda: stream_allocated(d, s2), osd_read)
            points = [f"snap-csi-snap-{s.split(':', 1)[1]}" for s in (s1, s2)]

            def direct(whole_object: bool) -> tuple[int, int]:
                found: list[tuple[int, int]] = []
                with librbd.Image(ctx, image, snapshot=points[1], read_only=True) as img:
                    img.diff_iterate(0, size, points[0],
                                     lambda o, n, e: found.append((o, n)) or 0,
                                     include_parent=True, whole_object=whole_object)
                return len(found), sum(n for _, n in found)

            exact = timed(args.runs, lambda: direct(False), osd_read)
            objects = timed(args.runs, lambda: direct(True), osd_read)

            def compare() -> int:
                changed = 0
                snaps = ["csi-snap-" + s.split(":", 1)[1] for s in (s1, s2)]
                with librbd.Image(ctx, snaps[0], snapshot="restore", read_only=True) as a, \
                        librbd.Image(ctx, snaps[1], snapshot="restore", read_only=True) as b:
                    for offset in range(0, size, 4 * MiB):
                        x, y = a.read(offset, 4 * MiB), b.read(offset, 4 * MiB)
                        if x != y:
                            changed += sum(4096 for k in range(0, len(x), 4096)
                                           if x[k:k + 4096] != y[k:k + 4096])
                return changed

            whole = timed(1, compare, osd_read)
        finally:
            ctx.close()
            conn.shutdown()
            d.stop()
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)

    def row(m: dict[str, Any]) -> dict[str, Any]:
        return {"seconds_p50": round(m["seconds_p50"], 4), "read_bytes_p50": m["read_bytes_p50"],
                "ranges": m["result"][0], "reported_bytes": m["result"][1]}

    return report(args, size, setup_s, ours, alloc, whole,
                  librbd_direct_exact=row(exact), librbd_direct_whole_object=row(objects))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="hostpath", choices=["hostpath", "rbd"])
    ap.add_argument("--fs", default="xfs", choices=["xfs", "btrfs", "ext4"])
    ap.add_argument("--gib", type=int, default=10)
    ap.add_argument("--delta-mib", type=int, default=100)
    ap.add_argument("--base-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    name = f"cbt-hostpath-{args.fs}" if args.backend == "hostpath" else "cbt-rbd"
    out = args.out or os.path.join(REPO, "bench", "results", f"{name}-latest.json")
    rng = random.Random(14)
    result = (hostpath if args.backend == "hostpath" else rbd)(args, rng)
    print(json.dumps(result, indent=2))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
