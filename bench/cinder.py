"""The Cinder backend's overhead over Cinder itself: CreateVolume and ControllerPublishVolume at
concurrency 1 and 16, beside the same operations done directly against the same Cinder (POST, then
polling every 5 ms, which is as soon as anyone can know), and the API requests each of ours sent.

    sudo .venv/bin/python -m bench.cinder [--out bench/results/cinder-latest.json] [-n 48]

Starts what the tests start (tests/openstack: a single-node Ceph, Keystone, Cinder with its RBD
driver), a driver with the Cinder backend in `cinder` attach mode and metrics on, and stops them
all at the end. Figures are per operation, in ms; "overhead" is our p50 minus Cinder's own p50.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .driver import REPO

if REPO not in sys.path:  # the harness lives in tests/
    sys.path.insert(0, REPO)

from csi_driver.csi import csi_pb2 as pb
from tests.harness import GiB, mount_cap, start_driver, write_config

from .measure import Measurement, percentile, run_pool

NODES = [f"bench-node-{i}" for i in range(64)]
POLL_S = 0.05  # the direct client's polls: Cinder's timestamps time it, not these


def _stamp(text: str) -> float:
    """Cinder's timestamps: UTC, microseconds, no zone."""
    import calendar

    whole, _, frac = text.partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + float(f"0.{frac or 0}")


def _timed_by_op(name: str, concurrency: int, count: int, op: Callable[[int], float]
                 ) -> Measurement:
    """run_pool, with each op's own figure (ms) in place of its wall time."""
    own: list[float] = []
    lock = threading.Lock()

    def call(i: int) -> None:
        value = op(i)
        with lock:
            own.append(value)

    m = run_pool(name, concurrency, count, call)
    m.latencies_ms = own
    return m


def _requests(metrics_url: str) -> dict[str, float]:
    """berth_backend_requests_total by service, from the driver's /metrics."""
    with urllib.request.urlopen(metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("berth_backend_requests_total{"):
            labels, _, value = line.rpartition(" ")
            service = labels.split('service="')[1].split('"')[0]
            found[service] = found.get(service, 0.0) + float(value)
    return found


def _row(m: Measurement, requests: float | None = None) -> dict[str, Any]:
    lat = sorted(m.latencies_ms)
    return {"scenario": m.scenario, "concurrency": m.concurrency, "ops": len(lat),
            "errors": dict(m.errors), "error_details": m.error_details,
            "ops_per_s": round(len(lat) / m.wall_s, 1) if m.wall_s else None,
            "p50_ms": round(percentile(lat, 50), 1) if lat else None,
            "p95_ms": round(percentile(lat, 95), 1) if lat else None,
            "requests_per_op": (None if requests is None or not lat
                                else round(requests / len(lat), 2))}


class Direct:
    """The same operations straight against Cinder, with the SDK's raw adapter."""

    def __init__(self, conn: Any) -> None:
        self.bs = conn.block_storage
        self.made: list[str] = []
        self.attachments: list[str] = []
        self.posts_ms: list[float] = []  # the POST's round trip alone
        self.lock = threading.Lock()

    def _until(self, path: str, key: str, done: Callable[[dict[str, Any]], bool]) -> None:
        while not done(self.bs.get(path).json()[key]):
            time.sleep(POLL_S)

    def create(self, i: int) -> float:
        """Cinder's own time: the POST's round trip, then from the volume's creation to the
        moment Cinder marked it available, by Cinder's own timestamps (the host's clock), so
        how often this client polls does not count."""
        body = {"volume": {"name": f"direct-{uuid.uuid4().hex[:8]}", "size": 1,
                           "volume_type": "ceph1", "availability_zone": "az1"}}
        t0 = time.time()
        resp = self.bs.post("/volumes", json=body)
        assert resp.status_code == 202, resp.text
        vol = resp.json()["volume"]
        posted = time.time() - t0
        with self.lock:
            self.posts_ms.append(posted * 1000)
        final: dict[str, Any] = {}

        def done(v: dict[str, Any]) -> bool:
            final.update(v)
            return bool(v["status"] != "creating")

        self._until(f"/volumes/{vol['id']}", "volume", done)
        with self.lock:
            self.made.append(vol["id"])
        return (posted + _stamp(final["updated_at"]) - _stamp(final["created_at"])) * 1000

    def attach(self, i: int) -> None:
        vid = self.made[i]
        connector = {"host": NODES[i % len(NODES)], "ip": "", "initiator": "", "platform":
                     "x86_64", "os_type": "linux", "multipath": False, "do_local_attach": False}
        att = self.bs.post("/attachments", json={"attachment": {
            "volume_uuid": vid, "connector": connector, "mode": "rw"}},
            microversion="3.54").json()["attachment"]
        self.bs.post(f"/attachments/{att['id']}/action", json={"os-complete": att["id"]},
                     microversion="3.44")
        with self.lock:
            self.attachments.append(att["id"])

    def cleanup(self) -> None:
        for att in self.attachments:
            self.bs.delete(f"/attachments/{att}", microversion="3.54")
        for vid in self.made:
            self.bs.delete(f"/volumes/{vid}")
        self.made, self.attachments = [], []


def run(cloud: Any, workdir: Path, count: int) -> dict[str, Any]:
    tmp = workdir / "driver"
    tmp.mkdir(parents=True, exist_ok=True)
    from tests.test_cinder import backend_config

    config = backend_config(cloud, tmp, availabilityZones=["az1"], volumeType="ceph1",
                            timeoutSeconds=30, waitSeconds=120,
                            nodes={n: {} for n in NODES})
    port = 19000 + os.getpid() % 1000
    d = start_driver(tmp, write_config(tmp / "c.yaml", {"os": config}),
                     "--metrics-address", f"127.0.0.1:{port}")
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    rows: list[dict[str, Any]] = []
    made: list[str] = []
    lock = threading.Lock()

    took: dict[str, float] = {}  # volume ID -> CreateVolume's latency (ms)

    def create(i: int) -> None:
        t0 = time.perf_counter()
        vol = d.controller.CreateVolume(pb.CreateVolumeRequest(
            name=f"bench-{uuid.uuid4().hex[:8]}", volume_capabilities=[mount_cap()],
            capacity_range=pb.CapacityRange(required_bytes=GiB)), timeout=120).volume
        with lock:
            made.append(vol.volume_id)
            took[vol.volume_id] = (time.perf_counter() - t0) * 1000

    def paired(concurrency: int) -> None:
        """Per volume: our latency minus Cinder's own time for that very volume (its
        created_at -> updated_at at `available`, plus a direct POST's typical round trip)."""
        post = percentile(sorted(direct.posts_ms), 50) if direct.posts_ms else 0.0
        bs = cloud.user().block_storage
        for vid in made:
            v = bs.get(f"/volumes/{vid.partition(':')[2]}").json()["volume"]
            own = (_stamp(v["updated_at"]) - _stamp(v["created_at"])) * 1000 + post
            overheads.setdefault(concurrency, []).append(took[vid] - own)

    overheads: dict[int, list[float]] = {}

    def publish(i: int) -> None:
        d.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=made[i], node_id=NODES[i % len(NODES)], volume_capability=mount_cap()),
            timeout=120)

    def cleanup() -> None:
        for i, vid in enumerate(made):
            d.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
                volume_id=vid, node_id=NODES[i % len(NODES)]), timeout=120)
            d.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=120)
        made.clear()

    direct = Direct(cloud.user())
    try:
        create(0)  # the first request authenticates and discovers the endpoints: not timed
        cleanup()
        # Cinder's speed drifts during a run (its own periodic tasks, the pools filling): the
        # direct and the driver's operations alternate in blocks, so both see the same drift.
        for concurrency, n, blocks in ((1, max(8, count // 2), 4), (16, count, 3)):
            per = max(1, n // blocks)
            own_c = Measurement("cinder-own create", concurrency)
            own_a = Measurement("cinder-own attach", concurrency)
            ours_c = Measurement("CreateVolume", concurrency)
            ours_a = Measurement("ControllerPublishVolume", concurrency)
            sent_c = sent_a = 0.0
            for _ in range(blocks):
                for into, m in ((own_c, _timed_by_op("own", concurrency, per, direct.create)),
                                (own_a, run_pool("own", concurrency, per, direct.attach))):
                    into.latencies_ms += m.latencies_ms
                    into.wall_s += m.wall_s
                    into.absorb(m)
                direct.cleanup()
                before = _requests(metrics_url)
                m = run_pool("ours", concurrency, per, create)
                middle = _requests(metrics_url)
                paired(concurrency)
                m2 = run_pool("ours", concurrency, per, publish)
                sent_c += middle.get("volume", 0) - before.get("volume", 0)
                sent_a += _requests(metrics_url).get("volume", 0) - middle.get("volume", 0)
                for into, got in ((ours_c, m), (ours_a, m2)):
                    into.latencies_ms += got.latencies_ms
                    into.wall_s += got.wall_s
                    into.absorb(got)
                cleanup()
            rows += [_row(own_c), _row(own_a), _row(ours_c, sent_c), _row(ours_a, sent_a)]
    finally:
        direct.cleanup()
        cleanup()
        d.stop()
    by = {(r["scenario"], r["concurrency"]): r for r in rows}
    overhead = {}
    for ours, own in (("CreateVolume", "cinder-own create"),
                      ("ControllerPublishVolume", "cinder-own attach")):
        for c in (1, 16):
            a, b = by.get((ours, c)), by.get((own, c))
            if a and b and a["p50_ms"] is not None and b["p50_ms"] is not None:
                overhead[f"{ours} c={c}"] = round(a["p50_ms"] - b["p50_ms"], 1)
    for c, values in sorted(overheads.items()):
        values.sort()
        overhead[f"CreateVolume c={c}, per volume"] = round(percentile(values, 50), 1)
    return {"rows": rows, "overhead_p50_ms": overhead}


def render(result: dict[str, Any]) -> str:
    lines = [f"{'scenario':<26}{'C':>4}{'ops':>6}{'ops/s':>8}{'p50 ms':>9}{'p95 ms':>9}"
             f"{'req/op':>8}  errors"]
    for r in result["rows"]:
        lines.append(f"{r['scenario']:<26}{r['concurrency']:>4}{r['ops']:>6}"
                     f"{r['ops_per_s'] or '-':>8}{r['p50_ms'] or '-':>9}{r['p95_ms'] or '-':>9}"
                     f"{r['requests_per_op'] if r['requests_per_op'] is not None else '-':>8}"
                     f"  {r['errors'] or ''}")
    lines.append("overhead (our p50 - Cinder's own p50, ms): " + ", ".join(
        f"{k}: {v}" for k, v in result["overhead_p50_ms"].items()))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cinder", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "cinder-latest.json"))
    p.add_argument("-n", type=int, default=48, help="operations per concurrency-16 phase")
    args = p.parse_args()
    from tests.openstack.services import running_cloud

    with tempfile.TemporaryDirectory(prefix="berth-bench-cinder-") as work, \
            running_cloud(Path(work)) as cloud:
        result = run(cloud, Path(work), args.n)
    result["meta"] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "n": args.n,
                      "poll_s": POLL_S}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(render(result))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
