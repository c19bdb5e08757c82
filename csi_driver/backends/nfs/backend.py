"""NFS backend: one sub-directory of an export per volume (see share.py for the layout).

The controller works through libnfs (no kernel mount, no privilege); nodes mount
`server:/share/<subDir>` once per volume at NodeStage and bind it into pods at NodePublish, so
every volume has its own NFS mount: its own options, its own stale-handle recovery, and a pod sees
nothing of the share but its own directory.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from ... import errors, faults, ids
from ...node import bounded, mounts
from ..base import (
    AccessMode,
    Attachment,
    Backend,
    BackendConfig,
    Capability,
    Capacity,
    Condition,
    Expansion,
    Features,
    NodeInfo,
    Secrets,
    Snapshot,
    Source,
    Volume,
    VolumeRequest,
)
from . import failures, share, volumes
from .config import NfsConfig
from .image import ATTACHED_FILE, IMAGE_FILE, ImageAttacher
from .jobs import Job, Jobs
from .libnfs import Connection, NfsError, Pool
from .mount import mount_nfs
from .tree import Cancelled, copy_tree, remove_tree

log = logging.getLogger(__name__)



class NfsBackend(Backend):
    type_name = "nfs"
    Config = NfsConfig
    features = Features(
        access_modes=frozenset(AccessMode),
        block=True,  # image layout only
        parameters=volumes.PARAMETERS,
        mutable_parameters=volumes.MUTABLE,
        snapshots=True,
        clones=True,
        expansion=Expansion.ONLINE,
        volume_condition=True,
        # Image volumes are attached (one node at a time, checked by the node too).
        attach=True,
    )

    def __init__(self, name: str, config: BackendConfig, node: NodeInfo) -> None:
        super().__init__(name, config, node)
        assert isinstance(config, NfsConfig)
        self.config = config
        self.pool = Pool(config.server, config.share, config.controllerVersion,
                         config.timeoutSeconds)
        self.jobs = Jobs()
        self.images = ImageAttacher(os.path.join(config.nodeStateDir, name),
                                    config.timeoutSeconds, node.node_id)
        self._ready = False
        self._start_lock = threading.Lock()
        self._purge = threading.Event()
        self._claims = threading.Lock()  # claims are check-then-write: one at a time

    # -- connections and errors ----------------------------------------------------------
    @contextmanager
    def _conn(self) -> Iterator[Connection]:
        try:
            with self.pool.connection() as conn:
                yield conn
        except NfsError as exc:
            c = self.config
            raise (failures.mount_to_csi(exc, c.server, c.share, c.controllerVersion,
                                         c.timeoutSeconds)
                   if (exc.strerror or "").startswith("mount of")
                   else failures.to_csi(exc, c.server, c.share)) from exc

    # -- identity ------------------------------------------------------------------------
    def probe(self) -> None:
        with self._conn() as conn:
            if not self._ready:
                with self._start_lock:
                    if not self._ready:
                        share.prepare(conn)
                        # Copies run in the controller only (one, by leader election): at its
                        # start whatever a killed one left in tmp is garbage. A node plugin
                        # starting must leave tmp, and the trash, to the controller.
                        if self.node.controller:
                            for name, _ in conn.listdir(share.TMP):
                                share.to_trash(conn, f"{share.TMP}/{name}")
                            threading.Thread(target=self._purger, name=f"purge {self.name}",
                                             daemon=True).start()
                        self._ready = True
            conn.stat(share.META)

    def _started(self) -> None:
        if not self._ready:
            self.probe()

    def _connect(self, under: str = "/") -> Connection:
        """A connection of its own, for long work that should not hold a pooled one, with the
        share's directory `under` as its root."""
        export = self.config.share.rstrip("/") + under if under != "/" else self.config.share
        return Connection(self.config.server, export, self.config.controllerVersion,
                          self.config.timeoutSeconds)

    def _purger(self) -> None:
        """Empty the trash in the background: a delete of a million files is one rename.
        Abandoned copies go first, so their trash goes in the same round."""
        conn: Connection | None = None
        while True:
            try:
                conn = conn or self._connect()
                self._sweep_copies(conn)
                for name, _ in conn.listdir(share.TRASH):
                    remove_tree(conn, f"{share.TRASH}/{name}")
            except NfsError:
                if conn is not None:  # the server is away: reconnect next round
                    conn.close()
                    conn = None
            except Exception:  # the purger must outlive any one bad directory
                log.exception("backend %s: purging the trash failed; retrying later", self.name)
            # Often enough that an abandoned copy goes within half its age again.
            self._purge.wait(min(300.0, self.config.abandonAfterSeconds / 2))
            self._purge.clear()

    def _sweep_copies(self, conn: Connection) -> None:
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
            with self._claims:
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

    # -- records <-> interface types -------------------------------------------------------
    def _volume(self, local_id: str, rec: share.VolumeRecord, conn: Connection | None = None
                ) -> Volume:
        cond = None
        if conn is not None:
            present = conn.exists(f"/{rec.sub_dir}")
            cond = Condition(not present, "" if present else
                             f"directory {rec.sub_dir} is missing from "
                             f"{self.config.server}:{self.config.share}")
        return Volume(
            local_id=local_id, name=rec.name, size=rec.size, parameters=rec.parameters,
            context=rec.context, condition=cond, block=rec.block,
            mutable_parameters=rec.mutable,
            source=Source(rec.source_kind, rec.source_id) if rec.source_kind else None,
        )

    # -- controller: volumes -------------------------------------------------------------
    def create_volume(self, request: VolumeRequest) -> Volume:
        self._started()
        settings = volumes.settings(self.config, request.parameters)
        # A VolumeAttributesClass's values at create win over the StorageClass's.
        volumes.check_mutable(request.mutable_parameters)
        settings.update(request.mutable_parameters)
        sub_dir = share.render_sub_dir(settings["subDir"], dict(request.parameters),
                                       request.name)
        local_id = ids.local_id_for_name(request.name)
        layout = settings["volumeLayout"]
        block = request.block
        with self._conn() as conn:
            rec = share.volume_record(conn, local_id)
            if rec is not None:
                return self._volume(local_id, rec)  # the service compares what was asked
            source_path, source_size = (
                self._source_of(conn, request.source, layout, block) if request.source
                else ("", 0))
            # A copy is at least as large as what it copies.
            if request.limit and source_size > request.limit:
                raise errors.OutOfRange(
                    f"the source holds {source_size} bytes; limit_bytes is {request.limit}")
            size = max(request.size, source_size)
            with self._claims:
                share.claim(conn, sub_dir, request.name, local_id,
                            self.config.abandonAfterSeconds)
            path = f"/{sub_dir}"
            parent = os.path.dirname(path)
            if parent != "/":
                conn.makedirs(parent, 0o755)
            copying = f"{share.VOLUMES}/{local_id}.copying"
            if source_path and self.jobs.get(f"vol-{local_id}") is None:
                # Our own finished copy (the process died before the record) is adopted;
                # anything else in the way is somebody's data.
                ours = (share.read_json(conn, copying) or {}).get("name") == request.name
                if conn.exists(path) and not ours:
                    raise errors.AlreadyExists(
                        f"{sub_dir} already holds data (a retained volume?); a volume made from "
                        "a snapshot or a volume needs an empty place: choose another subDir")
                if not ours:
                    share.write_json(conn, copying, {"name": request.name, "subDir": sub_dir})
                if conn.exists(path):
                    source_path = ""
            elif not source_path:
                volumes.make_directory(conn, path, settings)
        if source_path:
            # A clone's source volume is held (no publish) while the copy runs.
            held = request.source.local_id if request.source and \
                request.source.kind == "volume" else ""
            self._wait_copy(f"vol-{local_id}", source_path, path, layout == volumes.IMAGE,
                            f"copying {request.source.kind if request.source else ''} into "
                            f"volume {request.name!r}", held)
        if layout == volumes.IMAGE:
            with self._conn() as conn:
                volumes.grow_image(conn, f"{path}/{IMAGE_FILE}", size, create=True)
        rec = share.VolumeRecord(
            name=request.name, sub_dir=sub_dir, size=size,
            parameters=dict(request.parameters), on_delete=settings["onDelete"],
            context={"server": self.config.server, "share": self.config.share,
                     "subDir": sub_dir, "nfsVersion": settings["nfsVersion"],
                     **({"mountOptions": settings["mountOptions"]}
                        if settings["mountOptions"] else {}),
                     **({"volumeLayout": volumes.IMAGE, "fsType": self.config.fsType}
                        if layout == volumes.IMAGE else {})},
            source_kind=request.source.kind if request.source else "",
            source_id=request.source.local_id if request.source else "",
            layout=layout, block=block, mutable=dict(request.mutable_parameters),
        )
        with self._conn() as conn:
            faults.point("nfs-create-volume")
            share.save_volume(conn, local_id, rec)
            if request.source:
                share.remove(conn, f"{share.VOLUMES}/{local_id}.copying")
        return self._volume(local_id, rec)

    def _source_of(self, conn: Connection, source: Source, layout: str, block: bool
                   ) -> tuple[str, int]:
        """Where a copy comes from, and its size."""
        if source.kind == "volume":
            rec = share.volume_record(conn, source.local_id)
            if rec is None:
                raise errors.NotFound(f"source volume {self.name}:{source.local_id} does not exist")
            volumes.same_kind((rec.layout, rec.block), (layout, block))
            volumes.not_attached(conn, source.local_id, rec)
            return f"/{rec.sub_dir}", rec.size
        snap = share.snapshot_record(conn, source.local_id)
        if snap is None:
            raise errors.NotFound(f"snapshot {self.name}:{source.local_id} does not exist")
        volumes.same_kind((snap.layout, snap.block), (layout, block))
        if not self._snapshot_ready(conn, source.local_id):
            raise errors.Aborted(
                f"snapshot {self.name}:{source.local_id} is not ready yet (its copy is running); "
                "the restore will go ahead once it is")
        return f"{share.SNAPSHOTS}/{source.local_id}", snap.size

    def _wait_copy(self, key: str, src: str, dst: str, image: bool, what: str,
                   source: str = "") -> bool:
        """Run (or join) the copy `src` -> `dst` and wait up to copyWaitSeconds; ABORTED while it
        runs on, so the caller's retry picks it up."""
        job = self.jobs.start(key, lambda job: self._copy(job, src, dst, image), source)
        if not job.done.wait(self.config.copyWaitSeconds):
            raise errors.Aborted(
                f"{what}: still copying ({job.progress.files} files, "
                f"{job.progress.bytes >> 20} MiB so far); retry later")
        self.jobs.forget(key)
        self._raise_failure(job)
        return True

    def _raise_failure(self, job: Job) -> None:
        """A finished copy's error, as the RPC that asks about it should report it."""
        if isinstance(job.error, NfsError):
            raise failures.to_csi(job.error, self.config.server, self.config.share) \
                from job.error
        if job.error is not None:
            raise job.error

    def _copy(self, job: Job, src: str, dst: str, image: bool) -> None:
        """Copy into tmp, then rename into place: `dst` appears only complete."""
        tmp = f"{share.TMP}/{job.key}"
        progress = job.progress

        def stop() -> bool:
            if progress.bytes >= 1 << 20:
                faults.point("nfs-copy")
            return job.cancel.is_set()

        progress.cancelled = stop
        with self._connect() as conn:
            remove_tree(conn, tmp)
            # Only a snapshot's map is trusted: nothing writes to a snapshot after its copy.
            known = (share.load_data_map(conn, src)
                     if src.startswith(f"{share.SNAPSHOTS}/") else None)
            copy_tree(self._connect, src, tmp, progress, self.config.copyWorkers, known)
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

    def delete_volume(self, local_id: str, *, secrets: Secrets) -> None:
        self._started()
        with self._conn() as conn:
            rec = share.volume_record(conn, local_id)
            if rec is None:
                return
            nodes = sorted(share.attachments(conn, local_id))
            if nodes:
                raise errors.FailedPrecondition(
                    f"volume {rec.name!r} is published to node {nodes[0]!r}; unpublish it first")
            path = f"/{rec.sub_dir}"
            if rec.on_delete == "delete":
                share.to_trash(conn, path)
                self._purge.set()
            elif rec.on_delete == "archive":
                stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
                archived = f"{os.path.dirname(path).rstrip('/')}/archived-" \
                           f"{os.path.basename(path)}-{stamp}"
                try:
                    conn.rename(path, archived)
                except NfsError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
            faults.point("nfs-delete-volume")
            # The record first: from then on a retried delete finds nothing to do, so it can
            # never touch a newer volume that takes the released subDir.
            share.remove(conn, f"{share.VOLUMES}/{local_id}.json")
            share.release(conn, rec.sub_dir, rec.name, local_id)

    def get_volume(self, local_id: str, *, secrets: Secrets) -> Volume | None:
        self._started()
        with self._conn() as conn:
            rec = share.volume_record(conn, local_id)
            return None if rec is None else self._volume(local_id, rec, conn)

    def list_volumes(self) -> Iterator[Volume]:
        self._started()
        with self._conn() as conn:
            found = []
            for local_id in share.ids(conn, share.VOLUMES):
                rec = share.volume_record(conn, local_id)
                if rec is not None:
                    found.append(self._volume(local_id, rec, conn))
        yield from found

    def capacity(self, parameters: Mapping[str, str]) -> Capacity:
        with self._conn() as conn:
            return Capacity(available=conn.available())

    def expand_volume(self, local_id: str, size: int, *, secrets: Secrets
                      ) -> tuple[int, bool]:
        """Directory volumes have no size to grow: the new size is recorded, nothing else;
        an image grows here and its filesystem on the node."""
        with self._conn() as conn:
            rec = share.volume_record(conn, local_id)
            if rec is None:
                raise errors.NotFound(f"volume {self.name}:{local_id} does not exist")
            if rec.layout == volumes.IMAGE:
                volumes.grow_image(conn, f"/{rec.sub_dir}/{IMAGE_FILE}", size)
            if size > rec.size:
                rec.size = size
                share.save_volume(conn, local_id, rec)
            return rec.size, rec.layout == volumes.IMAGE

    def modify_volume(self, local_id: str, mutable_parameters: Mapping[str, str],
                      *, secrets: Secrets) -> None:
        """Record the new mount settings; the node applies them at its next NodeStage."""
        volumes.check_mutable(mutable_parameters)
        self._started()
        with self._conn() as conn:
            rec = share.volume_record(conn, local_id)
            if rec is None:
                raise errors.NotFound(f"volume {self.name}:{local_id} does not exist")
            rec.mutable.update(mutable_parameters)
            share.save_volume(conn, local_id, rec)

    # -- controller: snapshots -----------------------------------------------------------
    @staticmethod
    def _snapshot_ready(conn: Connection, local_id: str) -> bool:
        return conn.exists(f"{share.SNAPSHOTS}/{local_id}")

    def _snapshot(self, local_id: str, rec: share.SnapshotRecord, ready: bool) -> Snapshot:
        return Snapshot(local_id=local_id, name=rec.name, source_volume=rec.source_volume,
                        size=rec.size, created_at=rec.created, ready=ready)

    def create_snapshot(self, name: str, source_volume: str, parameters: Mapping[str, str],
                        *, secrets: Secrets) -> Snapshot:
        self._started()
        local_id = ids.local_id_for_name(name)
        with self._conn() as conn:
            rec = share.snapshot_record(conn, local_id)
            if rec is not None and rec.source_volume != source_volume:
                raise errors.AlreadyExists(
                    f"snapshot {name!r} already exists for another volume")
            volume = share.volume_record(conn, source_volume)
            if rec is None:
                if volume is None:
                    raise errors.NotFound(f"volume {self.name}:{source_volume} does not exist")
                volumes.not_attached(conn, source_volume, volume)
                rec = share.SnapshotRecord(name=name, source_volume=source_volume,
                                           size=volume.size, layout=volume.layout,
                                           block=volume.block)
                share.save_snapshot(conn, local_id, rec)
            if self._snapshot_ready(conn, local_id):
                return self._snapshot(local_id, rec, True)
            key = f"snap-{local_id}"
            if volume is not None and self.jobs.get(key) is None:
                # A copy (re)starting: the volume may have been published since the first try.
                volumes.not_attached(conn, source_volume, volume)
        if volume is None:
            raise errors.FailedPrecondition(
                f"the copy of snapshot {name!r} did not finish and its volume is gone; "
                "delete the snapshot")
        image = volume.layout == volumes.IMAGE
        job = self.jobs.start(key, lambda job: self._copy(
            job, f"/{volume.sub_dir}", f"{share.SNAPSHOTS}/{local_id}", image), source_volume)
        if job.done.wait(min(self.config.copyWaitSeconds, 1)):
            self.jobs.forget(key)
            self._raise_failure(job)
            return self._snapshot(local_id, rec, True)
        return self._snapshot(local_id, rec, False)

    def delete_snapshot(self, local_id: str, *, secrets: Secrets) -> None:
        self._started()
        if not self.jobs.cancel(f"snap-{local_id}", wait=self.config.timeoutSeconds):
            raise errors.Aborted(f"the copy of snapshot {self.name}:{local_id} is still "
                                 "stopping; retry the delete")
        with self._conn() as conn:
            share.to_trash(conn, f"{share.SNAPSHOTS}/{local_id}")
            share.to_trash(conn, f"{share.TMP}/snap-{local_id}")
            share.remove(conn, share.data_map_path(f"{share.SNAPSHOTS}/{local_id}"))
            share.remove(conn, f"{share.SNAPSHOTS}/{local_id}.json")
        self._purge.set()

    def get_snapshot(self, local_id: str, *, secrets: Secrets) -> Snapshot | None:
        self._started()
        with self._conn() as conn:
            rec = share.snapshot_record(conn, local_id)
            if rec is None:
                return None
            return self._snapshot(local_id, rec, self._snapshot_ready(conn, local_id))

    def list_snapshots(self, *, secrets: Secrets) -> Iterator[Snapshot]:
        self._started()
        with self._conn() as conn:
            found = []
            for local_id in share.ids(conn, share.SNAPSHOTS):
                rec = share.snapshot_record(conn, local_id)
                if rec is not None:
                    found.append(self._snapshot(local_id, rec,
                                                self._snapshot_ready(conn, local_id)))
        yield from found

    # -- attach ------------------------------------------------------------------------------
    # Recorded for every volume, so the services can hold a single-node directory volume to
    # one node too and tell a publish with another capability apart; only an image's node
    # checks it at NodeStage (a directory is an NFS mount any node may make).
    def _record(self, conn: Connection, local_id: str) -> share.VolumeRecord:
        rec = share.volume_record(conn, local_id)
        if rec is None:
            raise errors.NotFound(f"volume {self.name}:{local_id} does not exist")
        return rec

    def attachments(self, local_id: str, *, secrets: Secrets) -> list[Attachment]:
        self._started()
        with self._conn() as conn:
            self._record(conn, local_id)
            return [Attachment.from_record(node, a)
                    for node, a in share.attachments(conn, local_id).items()]

    def attach(self, local_id: str, attachment: Attachment, *, secrets: Secrets
               ) -> Mapping[str, str]:
        self._started()
        with self._conn() as conn:
            rec = self._record(conn, local_id)
            if self.jobs.copying_from(local_id):
                raise errors.Aborted(
                    f"volume {rec.name!r} is being copied (a snapshot or clone of it); it can be "
                    "published once the copy is done, which a retry will find")
            if rec.layout == volumes.IMAGE:
                holder = share.read_text(conn, f"/{rec.sub_dir}/{ATTACHED_FILE}")
                if holder and holder != attachment.node_id:
                    raise errors.FailedPrecondition(
                        f"the image volume is still staged on node {holder!r} (its marker "
                        f"{ATTACHED_FILE} is there); unstage it there first")
            nodes = share.attachments(conn, local_id)
            nodes[attachment.node_id] = attachment.to_record()
            share.save_attachments(conn, local_id, nodes)
        return {}

    def detach(self, local_id: str, node_id: str, *, secrets: Secrets) -> None:
        self._started()
        with self._conn() as conn:
            self._record(conn, local_id)
            nodes = share.attachments(conn, local_id)
            kept = {n: a for n, a in nodes.items() if node_id and n != node_id}
            if kept != nodes:
                share.save_attachments(conn, local_id, kept)

    def node_known(self, node_id: str, *, secrets: Secrets) -> bool:
        self._started()
        with self._conn() as conn:
            return share.node_registered(conn, node_id)

    def register_node(self, node_id: str) -> None:
        with self._conn() as conn:
            share.register_node(conn, node_id)

    # -- node ----------------------------------------------------------------------------
    def stage(self, local_id: str, staging_path: str, capability: Capability,
              context: Mapping[str, str], *, secrets: Secrets) -> None:
        context = self._modified(local_id, context)
        server = context.get("server") or self.config.server
        export = context.get("share") or self.config.share
        sub_dir = context.get("subDir", "")
        if ".." in sub_dir.split("/"):
            raise errors.InvalidArgument(f"subDir {sub_dir!r} leaves the share")
        path = "/".join(p for p in (export.rstrip("/"), sub_dir.strip("/")) if p) or "/"
        options = [*self.config.mountOptions,
                   *(o for o in context.get("mountOptions", "").split(",") if o)]
        version = context.get("nfsVersion") or self.config.nfsVersion
        read_only = capability.read_only
        if context.get("volumeLayout") == volumes.IMAGE:
            # Bounded (losetup, blkid and mkfs on a server that stopped answering never
            # return); one at a time per volume, so a retry never races a stage still running.
            bounded.call(
                f"stage:{local_id}", self.images.stage, local_id, staging_path, capability,
                capability.fs_type or context.get("fsType") or self.config.fsType,
                lambda where: mount_nfs(server, path, where, version, options, False,
                                        self.config.timeoutSeconds),
                read_only, timeout=self._stage_wait())
            return
        if capability.block:
            raise errors.FailedPrecondition("a directory volume has no block device")
        if not os.path.isdir(staging_path):
            raise errors.FailedPrecondition(f"staging path {staging_path} is not a directory")
        for flag in capability.mount_flags:
            options += [o for o in flag.split(",") if o]
        mount_nfs(server, path, staging_path, version, options, read_only,
                  self.config.timeoutSeconds)

    def _modified(self, local_id: str, context: Mapping[str, str]) -> Mapping[str, str]:
        """The context with what ControllerModifyVolume changed since CreateVolume. The CO
        passes CreateVolume's context for ever and the node cannot ask the controller, so the
        node reads the volume's record from the share itself (one libnfs read)."""
        c = self.config
        if (not context.get("subDir")
                or (context.get("server", c.server), context.get("share", c.share))
                != (c.server, c.share)):
            return context  # a static PV of another export: no record of ours
        try:
            with self._conn() as conn:
                rec = share.volume_record(conn, local_id)
                if (context.get("volumeLayout") == volumes.IMAGE
                        and self.node.node_id not in share.attachments(conn, local_id)):
                    raise errors.FailedPrecondition(
                        f"the image volume is not published to node {self.node.node_id!r}: "
                        "ControllerPublishVolume comes first (an image is used by one node at "
                        "a time; the CSIDriver needs attachRequired: true)")
        except (ValueError, TypeError) as exc:  # not a record we can read: mount as made
            log.warning("backend %s: record of %s unreadable: %s", self.name, local_id, exc)
            return context
        if rec is None or rec.sub_dir != context["subDir"] or not rec.mutable:
            return context  # a static PV, or never modified
        return {**context, **rec.mutable}

    def capability_problem(self, capability: Capability, parameters: Mapping[str, str]
                           ) -> str | None:
        layout = parameters.get("volumeLayout", self.config.volumeLayout)
        return volumes.layout_problem(layout, capability)

    def _stage_wait(self) -> float:
        return max(120.0, 6.0 * self.config.timeoutSeconds)

    def unstage(self, local_id: str, staging_path: str) -> None:
        if bounded.busy(f"stage:{local_id}"):
            raise errors.Unavailable("a NodeStage of this volume has not finished yet (is the "
                                     "server answering?); retry")
        if self.images.is_image(local_id):
            self.images.unstage(local_id, staging_path)
        else:
            mounts.unmount(staging_path, wait=self.config.timeoutSeconds)

    def owns_mount(self, local_id: str, path: str) -> bool:
        if self.images.is_image(local_id):
            return self.images.owns(local_id, path)
        # A directory volume's mount is an NFS mount of this backend's server: told from the
        # mount table alone (a stat of it could block on a dead server).
        entry = mounts.mount_at(path)
        server = self.config.server
        host = f"[{server}]" if ":" in server else server
        return (entry is not None and entry.fs_type in ("nfs", "nfs4")
                and entry.source.startswith(f"{host}:"))

    def node_expand(self, local_id: str, volume_path: str, staging_path: str, required: int,
                    *, secrets: Secrets) -> int:
        if not self.images.is_image(local_id):
            return required  # a directory has no size of its own
        return bounded.call(f"expand:{local_id}", self.images.expand, local_id, volume_path,
                            timeout=self._stage_wait())

    def node_condition(self, local_id: str, volume_path: str) -> Condition:
        image = self.images.condition(local_id)
        if image is not None and image.abnormal:
            return image
        try:
            bounded.call(f"open:{volume_path}", mounts.touch_open, volume_path,
                         timeout=self.config.timeoutSeconds)
        except errors.Unavailable as exc:
            return Condition(True, str(exc))
        except OSError as exc:
            if exc.errno == errno.ESTALE:
                return Condition(True, f"stale NFS file handle at {volume_path}: the directory "
                                       "was removed or replaced on the server")
            return Condition(True, f"{volume_path}: {exc.strerror}")
        return Condition(False, "")
