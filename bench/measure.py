"""Timing N operations at concurrency C, and the raw numbers a scenario hands to the report."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .csi import RpcFailure


@dataclass
class Measurement:
    """One report row: per-op latencies of the ops that succeeded, and what failed."""

    scenario: str
    concurrency: int
    latencies_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)
    # The first message per error key, so the report can say what went wrong, not only how often.
    error_details: dict[str, str] = field(default_factory=dict)
    status: str = "ok"  # "ok", "unimplemented", "unsupported", "skipped" or "error"
    note: str = ""

    def fail(self, exc: RpcFailure) -> None:
        self.errors[exc.key] += 1
        self.error_details.setdefault(exc.key, exc.details)

    def absorb(self, other: Measurement) -> None:
        """Count the errors of an untimed phase (setup, teardown) against this row."""
        for key, count in other.errors.items():
            self.errors[key] += count
            self.error_details.setdefault(key, other.error_details[key])


def percentile(sorted_ms: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values: always a latency that was actually observed."""
    rank = max(1, math.ceil(q / 100 * len(sorted_ms)))
    return sorted_ms[rank - 1]


def run_pool(name: str, concurrency: int, count: int, op: Callable[[int], None]) -> Measurement:
    """Run op(0..count-1) on `concurrency` threads; time each call and the whole phase.

    An op that raises RpcFailure is counted as an error and left out of the latencies; any other
    exception is a bug in the benchmark and propagates.
    """
    result = Measurement(name, concurrency)
    lock = threading.Lock()

    def timed(i: int) -> None:
        start = time.perf_counter()
        try:
            op(i)
        except RpcFailure as exc:
            with lock:
                result.fail(exc)
            return
        elapsed = (time.perf_counter() - start) * 1000
        with lock:
            result.latencies_ms.append(elapsed)

    start = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=name)
    try:
        for future in [pool.submit(timed, i) for i in range(count)]:
            future.result()  # re-raise benchmark bugs here rather than losing them
    finally:
        # On Ctrl-C or a bug, drop the queued ops instead of running them all first.
        pool.shutdown(wait=True, cancel_futures=True)
    result.wall_s = time.perf_counter() - start
    return result
