"""Snapshot, restore and clone copies of NFS volumes, and what abandoned ones leave behind.

A copy runs in a job (jobs.py) into tmp and is renamed into place complete, so a copy that is
there is whole; the RPC waits up to copyWaitSeconds and answers "not ready yet" after that.
"""

from __future__ import annotations

import logging
import os
import threading

from ... import errors, faults
from . import share
from .access import Access
from .image import ATTACHED_FILE
from .jobs import Job, Jobs
from .libnfs import Connection, NfsError
from .tree import Cancelled, copy_tree, remove_tree

log = logging.getLogger(__name__)


class Copies:
    def __init__(self, name: str, access: Access) -> None:
        self.name = name
        self.access = access
        self.config = access.config
        self.jobs = Jobs()
        self.claims = threading.Lock()  # claims are check-then-write: one at a time

    def wait(self, key: str, src: str, dst: str, image: bool, what: str,
             source: str = "") -> None:
        """Run (or join) the copy `src` -> `dst` and wait up to copyWaitSeconds; ABORTED while it
        runs on, so the caller's retry picks it up. `source`: a volume held while it runs."""
        job = self.jobs.start(key, lambda job: self.copy(job, src, dst, image), source)
        if not job.done.wait(self.config.copyWaitSeconds):
            raise errors.Aborted(
                f"{what}: still copying ({job.progress.files} files, "
                f"{job.progress.bytes >> 20} MiB so far); retry later")
        self.jobs.forget(key)
        self.raise_failure(job)

    def raise_failure(self, job: Job) -> None:
        """A finished copy's error, as the RPC that asks about it should report it."""
        if isinstance(job.error, NfsError):
            raise self.access.csi_error(job.error) from job.error
        if job.error is not None:
            raise job.error

    def copy(self, job: Job, src: str, dst: str, image: bool) -> None:
        """Copy into tmp, then rename into place: `dst` appears only complete."""
        tmp = f"{share.TMP}/{job.key}"
        progress = job.progress

        def stop() -> bool:
            if progress.bytes >= 1 << 20:
                faults.point("nfs-copy")
            return job.cancel.is_set()

        progress.cancelled = stop
        with self.access.connect() as conn:
            remove_tree(conn, tmp)
            # Only a snapshot's map is trusted: nothing writes to a snapshot after its copy.
            known = (share.load_data_map(conn, src)
                     if src.startswith(f"{share.SNAPSHOTS}/") else None)
            copy_tree(self.access.connect, src, tmp, progress, self.config.copyWorkers, known)
            parent = os.path.dirname(dst)
            if parent != "/":
                conn.makedirs(parent, 0o755)
            if image:  # the source's node marker is not the copy's
                share.remove(conn, f"{tmp}/{ATTACHED_FILE}")
            if dst.startswith(f"{share.SNAPSHOTS}/"):
                share.save_data_map(conn, tmp, share.data_map_path(dst), progress.data_map())
            if job.cancel.is_set():  # deleted meanwhile: the copy must not appear after all
                raise Cancelled
            conn.rename(tmp, dst)

    def sweep(self, conn: Connection) -> None:
        """Reclaim what a CreateVolume from a source leaves when it is never retried (its PVC
        deleted while it answered ABORTED): the marker, the claim, the copy in tmp and a
        finished copy no record owns. Alive by the claims' rule: every retry refreshes the
        claim, so only an abandoned create's claim grows older than abandonAfterSeconds."""
        ttl = self.config.abandonAfterSeconds
        for entry, _ in conn.listdir(share.VOLUMES):
            if not entry.endswith(".copying"):
                continue
            local_id, marker = entry[:-len(".copying")], f"{share.VOLUMES}/{entry}"
            # Under the claims lock: a retry arriving now either refreshed the claim already
            # (fresh: left alone) or claims after the sweep, finding nothing and starting over.
            with self.claims:
                info = share.read_json(conn, marker) or {}
                name, sub_dir = str(info.get("name", "")), str(info.get("subDir", ""))
                if share.volume_record(conn, local_id) is not None:
                    share.remove(conn, marker)  # made: only the marker's removal was lost
                    continue
                owned = share.claim_age(conn, sub_dir, name) if sub_dir else None
                # Released or taken over (or a marker without subDir): the marker's own time.
                since = owned if owned is not None else share.age(conn, marker)
                if since is None or since < ttl:
                    continue
                if not self.jobs.cancel(f"vol-{local_id}", wait=self.config.timeoutSeconds):
                    continue  # still stopping: next round
                log.info("backend %s: reclaiming the copy of volume %r, abandoned %.0f s ago",
                         self.name, name, since)
                share.to_trash(conn, f"{share.TMP}/vol-{local_id}")
                if owned is not None:
                    # Still ours, so what is at the subDir is the finished copy (a restore
                    # never starts over data it did not make).
                    share.to_trash(conn, f"/{sub_dir}")
                    share.release(conn, sub_dir, name, local_id)
                share.remove(conn, marker)
