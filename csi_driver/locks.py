"""Keyed in-flight locks: a second operation on a busy volume ID or name gets ABORTED at once.

The CSI spec asks for ABORTED rather than queueing, so the CO retries with backoff instead of piling
up threads behind a slow operation. There is no global lock: unrelated volumes never wait.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import Aborted


class KeyedLocks:
    def __init__(self) -> None:
        self._busy: set[str] = set()
        self._guard = threading.Lock()

    @contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        wanted = {k for k in keys if k}
        with self._guard:
            clash = wanted & self._busy
            if clash:
                raise Aborted(
                    f"an operation on {sorted(clash)[0]!r} is already in progress; retry later"
                )
            self._busy |= wanted
        try:
            yield
        finally:
            with self._guard:
                self._busy -= wanted
