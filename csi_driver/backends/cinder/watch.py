"""Waiting for many new volumes at once with one request per round.

Cinder says when a volume is ready only when asked. Polled one by one, sixteen creates in flight
cost sixteen requests per round, all served by the same API workers that are making the volumes.
Here the waiters of one connection share their rounds: one of them (the leader) lists the
connection's volumes still `creating` (ours only: a metadata filter), and every waiter whose volume
has left that list is read once, alone, for its final state. Each waiter keeps its own schedule
(first look after about as long as creates took lately, then growing steps); a round is made when
the earliest waiter is due. When the leader's own volume is done, another waiter takes over.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ... import errors
from .cloud import Api

_FIRST_STEP, _GROWTH, _MAX_STEP = 0.02, 1.6, 2.0


@dataclass
class _Waiter:
    local_id: str
    due: float
    step: float = _FIRST_STEP
    result: dict[str, Any] | None = None
    done: bool = False


@dataclass
class _Group:
    waiters: dict[str, _Waiter] = field(default_factory=dict)
    leader: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)


class Watch:
    def __init__(self, filters: dict[str, str], typical: Callable[[], float],
                 learned: Callable[[float], None]) -> None:
        self._filters = filters  # the list filter that selects our volumes
        self._typical = typical  # how long a create took lately (s)
        self._learned = learned
        self._lock = threading.Lock()
        self._groups: dict[int, _Group] = {}

    def _group(self, api: Api) -> _Group:
        with self._lock:
            return self._groups.setdefault(id(api), _Group())

    def until_created(self, api: Api, local_id: str, deadline: float, what: str
                      ) -> dict[str, Any] | None:
        """The volume once it is no longer `creating` (None: it is gone)."""
        group = self._group(api)
        started = time.monotonic()
        me = _Waiter(local_id, started + self._typical() * 0.9)
        with group.cond:
            group.waiters[local_id] = me
        try:
            while True:
                with group.cond:
                    if me.done:
                        break
                    if time.monotonic() >= deadline:
                        raise errors.DeadlineExceeded(
                            f"{what}: still creating after {deadline - started:.0f}s; retry "
                            "(the next call finds the same volume and goes on waiting)")
                    if group.leader:
                        group.cond.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
                        continue
                    group.leader = True
                try:
                    self._lead(api, group, me, deadline)
                finally:
                    with group.cond:
                        group.leader = False
                        group.cond.notify_all()
        finally:
            with group.cond:
                group.waiters.pop(local_id, None)
        self._learned(time.monotonic() - started)
        return me.result

    def _lead(self, api: Api, group: _Group, me: _Waiter, deadline: float) -> None:
        """Make rounds until our own volume is done (or our deadline passes)."""
        while not me.done and time.monotonic() < deadline:
            with group.cond:
                due = min(w.due for w in group.waiters.values())
            time.sleep(max(0.0, min(due, deadline) - time.monotonic()))
            if time.monotonic() >= deadline:
                return
            with group.cond:
                alone = len(group.waiters) == 1
            if alone:  # one volume: reading it is one request, and says everything
                creating = set()
            else:
                query = urllib.parse.urlencode({**self._filters, "status": "creating"})
                rows = api.volume("GET", f"/volumes/detail?{query}", "watching new volumes")
                creating = {str(v["id"]) for v in rows["volumes"]}
            now = time.monotonic()
            with group.cond:
                ready = [w for w in group.waiters.values()
                         if not w.done and w.local_id not in creating]
                for w in group.waiters.values():
                    if w.due <= now:
                        w.due, w.step = now + w.step, min(w.step * _GROWTH, _MAX_STEP)
            for w in ready:
                found = api.volume("GET", f"/volumes/{urllib.parse.quote(w.local_id, safe='')}",
                                   f"reading volume {w.local_id}", missing_ok=True)
                data = None if found is None else dict(found["volume"])
                if data is not None and data.get("status") == "creating":
                    continue  # still being made (or made after the list was read)
                with group.cond:
                    w.result, w.done = data, True
                    group.cond.notify_all()
