"""Copies that outlive the RPC that started them.

A snapshot, restore or clone of a large directory takes longer than any RPC deadline, so the copy
runs in a thread and the RPC answers "not ready yet" (CreateSnapshot's ready_to_use=false, or
ABORTED for CreateVolume, which the provisioner retries). Nothing of a job is kept but the thread:
after a restart the retried RPC finds no job and no finished copy, and starts the copy again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ... import requestid
from .tree import Progress


@dataclass
class Job:
    key: str
    progress: Progress
    source: str = ""  # the volume (local id) being copied, if a volume is the source
    done: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class Jobs:
    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Job | None:
        with self._lock:
            return self._jobs.get(key)

    def start(self, key: str, work: Callable[[Job], None], source: str = "") -> Job:
        """The running job for `key`, or a new one running `work` (copying volume `source`)."""
        with self._lock:
            job = self._jobs.get(key)
            if job is not None:
                return job
            job = Job(key, Progress(), source)
            job.progress.cancelled = job.cancel.is_set
            self._jobs[key] = job

        def run() -> None:
            try:
                work(job)
            except BaseException as exc:
                job.error = exc
            finally:
                job.done.set()

        threading.Thread(target=requestid.in_context(run), name=f"copy {key}",
                         daemon=True).start()
        return job

    def running(self) -> int:
        with self._lock:
            return sum(1 for j in self._jobs.values() if not j.done.is_set())

    def copying_from(self, source: str) -> bool:
        """Whether a copy of volume `source` is still running (publishing it would tear it)."""
        with self._lock:
            return any(j.source == source and not j.done.is_set() for j in self._jobs.values())

    def forget(self, key: str) -> None:
        with self._lock:
            self._jobs.pop(key, None)

    def cancel(self, key: str, wait: float) -> bool:
        """Stop the job for `key`; False when it is still running after `wait` seconds."""
        job = self.get(key)
        if job is None:
            return True
        job.cancel.set()
        if not job.done.wait(wait):
            return False
        self.forget(key)
        return True
