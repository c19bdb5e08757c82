"""The driver's own view: it logs one line per RPC with its status and duration, which separates
time spent in the driver from time spent in gRPC and in the benchmark's client threads."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from .measure import percentile

_LINE = re.compile(r"rpc=/csi\.v1\.\w+/(\w+) .*?status=(\w+) duration_ms=([\d.]+)")


@dataclass
class ServerRpc:
    method: str
    calls: int
    statuses: dict[str, int]
    p50_ms: float
    p99_ms: float
    max_ms: float


def summarize(log_path: str) -> list[ServerRpc]:
    """Per-method durations of every RPC in the log; empty if the log format is not recognised."""
    durations: dict[str, list[float]] = {}
    statuses: dict[str, Counter[str]] = {}
    with open(log_path, errors="replace") as f:
        for line in f:
            m = _LINE.search(line)
            if m:
                durations.setdefault(m[1], []).append(float(m[3]))
                statuses.setdefault(m[1], Counter())[m[2]] += 1
    out = []
    for method, values in durations.items():
        values.sort()
        out.append(ServerRpc(method, len(values), dict(statuses[method]),
                             percentile(values, 50), percentile(values, 99), values[-1]))
    return out
