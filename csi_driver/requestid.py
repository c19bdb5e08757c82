"""The id of the RPC being served, on every log line it causes.

The interceptor sets it for the thread serving the RPC; threads started for the RPC (copies,
bounded node calls) run in a copy of its context (`in_context`), so a line logged deep in a
backend, or by a copy that outlives the RPC, still names the request. Lines outside any RPC
(start-up, background purges) show "-".
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable

current: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def in_context(fn: Callable[[], None]) -> Callable[[], None]:
    """`fn`, to run in another thread with the caller's request id."""
    ctx = contextvars.copy_context()
    return lambda: ctx.run(fn)


class Stamp(logging.Filter):
    """Adds `rid` (the request id) to each record, for the log format to print."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rid = current.get()
        return True
