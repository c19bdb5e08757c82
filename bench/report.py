"""Turning measurements into the printed table and the JSON file."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .measure import Measurement, percentile
from .serverlog import ServerRpc

# Rows whose failures mean "the driver does not offer this", which is a status, not a bug.
QUIET_STATUSES = ("unimplemented", "unsupported", "skipped")


@dataclass
class Row:
    group: str  # the scenario that produced the row (--only name)
    scenario: str
    concurrency: int
    ops: int
    errors: int
    ops_per_s: float | None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    status: str
    note: str

    @classmethod
    def of(cls, group: str, m: Measurement) -> Row:
        lat = sorted(m.latencies_ms)

        def pct(q: float) -> float | None:
            return percentile(lat, q) if lat else None

        rate = len(lat) / m.wall_s if lat and m.wall_s > 0 else None
        status = m.status if m.status != "ok" or not m.errors else "errors"
        return cls(group, m.scenario, m.concurrency, len(lat), sum(m.errors.values()), rate,
                   pct(50), pct(90), pct(99), pct(100), status, m.note)


@dataclass
class ErrorLine:
    row: str
    rpc_status: str  # "Method CODE"
    count: int
    detail: str
    expected: bool  # part of a row reported as unimplemented/unsupported


@dataclass
class Report:
    meta: dict[str, Any]
    startup_ms: float | None = None
    socket_ms: float | None = None
    rss_idle_mib: float | None = None
    rss_peak_mib: float | None = None
    rss_hwm_mib: float | None = None
    rss_samples: int = 0
    driver_exit_code: int | None = None
    rows: list[Row] = field(default_factory=list)
    # Per-RPC durations from the driver's own log.
    server_rpcs: list[ServerRpc] = field(default_factory=list)
    errors: list[ErrorLine] = field(default_factory=list)
    anomalies: dict[str, int] = field(default_factory=dict)
    leaks: list[str] = field(default_factory=list)
    bench_failures: list[str] = field(default_factory=list)

    def add(self, group: str, measurements: list[Measurement]) -> None:
        for m in measurements:
            row = Row.of(group, m)
            self.rows.append(row)
            label = f"{group}/{m.scenario} C={m.concurrency}"
            for key, count in sorted(m.errors.items()):
                self.errors.append(ErrorLine(label, key, count, m.error_details[key],
                                             m.status in QUIET_STATUSES))

    @property
    def ok(self) -> bool:
        """No unexpected RPC error, no leak, no anomaly, a clean driver exit, no bench crash."""
        return (self.driver_exit_code == 0 and not self.leaks and not self.anomalies
                and not self.bench_failures and all(e.expected for e in self.errors))


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(report: Report) -> str:
    head = (f"{'scenario':<16}{'C':>3}{'ops':>6}{'err':>5}{'ops/s':>9}"
            f"{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>10}  note")
    lines = [head, "-" * len(head)]
    for r in report.rows:
        note = r.note if r.status in ("ok", "errors") else f"{r.status.upper()} {r.note}".strip()
        lines.append(
            f"{r.scenario:<16}{r.concurrency:>3}{r.ops:>6}{r.errors:>5}{_num(r.ops_per_s, 1):>9}"
            f"{_num(r.p50_ms):>9}{_num(r.p90_ms):>9}{_num(r.p99_ms):>9}{_num(r.max_ms):>10}"
            f"  {note}".rstrip()
        )
    if report.server_rpcs:
        lines += ["", f"{'driver-side (its log)':<26}{'calls':>7}{'p50 ms':>9}{'p99 ms':>9}"
                      f"{'max ms':>10}  statuses"]
        for s in report.server_rpcs:
            codes = " ".join(f"{k}={v}" for k, v in sorted(s.statuses.items()))
            lines.append(f"{s.method:<26}{s.calls:>7}{s.p50_ms:>9.2f}{s.p99_ms:>9.2f}"
                         f"{s.max_ms:>10.2f}  {codes}")
    lines.append("")
    lines.append(f"start-up: {_num(report.startup_ms, 0)} ms from spawn to a GetPluginInfo answer "
                 f"(socket file after {_num(report.socket_ms, 0)} ms)")
    lines.append(f"RSS: idle {_num(report.rss_idle_mib, 1)} MiB, "
                 f"peak {_num(report.rss_peak_mib, 1)} MiB ({report.rss_samples} samples, 20 ms), "
                 f"VmHWM {_num(report.rss_hwm_mib, 1)} MiB")
    rbd = report.meta.get("rbd")
    if rbd:
        purge = rbd.get("purge_wait_s")
        lines.append(
            f"ceph {rbd['ceph_version'].removeprefix('ceph version ').split(' (')[0]}: up in "
            f"{_num(rbd['cluster_start_s'].get('total'), 1)} s; trash and pool empty "
            + ("-" if purge is None else f"{purge:.1f} s") + " after the final sweep")
    lines.append(f"driver exit status after SIGTERM: {report.driver_exit_code}")
    lines.append("status codes returned by the driver:" if report.errors else
                 "status codes returned by the driver: none but OK")
    for e in report.errors:
        tag = " (feature not offered)" if e.expected else ""
        lines.append(f"  {e.row}: {e.rpc_status} x{e.count}{tag}: {e.detail}")
    for title, items in (("anomalies", [f"{k} x{v}" for k, v in report.anomalies.items()]),
                         ("leaks", report.leaks), ("benchmark failures", report.bench_failures)):
        lines.append(f"{title}: {'none' if not items else ''}".rstrip())
        lines.extend(f"  {item}" for item in items)
    return "\n".join(lines)


def write_json(report: Report, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({**asdict(report), "ok": report.ok}, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)  # a reader never sees half a file
