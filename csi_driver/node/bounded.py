"""Calls that may never return (a path on an NFS server that went away), bounded in time.

The call runs in a daemon thread; after `timeout` the caller gets UNAVAILABLE and the thread is
left to finish whenever the server answers. At most one such thread per key exists, so a path
that hangs costs one stuck thread however often it is asked about.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from .. import requestid
from ..errors import Unavailable

T = TypeVar("T")
_busy: set[str] = set()
_guard = threading.Lock()


def busy(key: str) -> bool:
    """Whether a call under `key` is still running (perhaps stuck)."""
    with _guard:
        return key in _busy


def call(key: str, fn: Callable[..., T], *args: object, timeout: float) -> T:
    with _guard:
        if key in _busy:
            raise Unavailable(f"{key.partition(':')[2] or key}: an earlier call has not returned "
                              "yet (server not responding?)")
        _busy.add(key)
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn(*args))
        except BaseException as exc:
            error.append(exc)
        finally:
            with _guard:
                _busy.discard(key)

    thread = threading.Thread(target=requestid.in_context(run), name=f"bounded {key}",
                              daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise Unavailable(f"{key.partition(':')[2] or key} did not answer within {timeout:.0f}s "
                          "(server not responding?)")
    if error:
        raise error[0]
    return result[0]
