"""NFS backend: one sub-directory of an export per volume (see share.py for the layout).

The controller works through libnfs (no kernel mount, no privilege); nodes mount
`server:/share/<subDir>` once per volume at NodeStage and bind it into pods at NodePublish, so
every volume has its own NFS mount: its own options, its own stale-handle recovery, and a pod sees
nothing of the share but its own directory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping

from ... import errors, faults, ids, metrics
from ..base import (
    AccessMode,
    Attachment,
    Backend,
    BlockMap,
    BlockQuery,
    Capability,
    Capacity,
    Condition,
    Expansion,
    Features,
    NodeExpandRequest,
    NodeInfo,
    Query,
    Secrets,
    Snapshot,
    SnapshotRequest,
    Source,
    StageRequest,
    Volume,
    VolumeRequest,
    VolumeUpdate,
)
from . import share, volumes
from .access import Access
from .attach import Attacher
from .config import NfsConfig
from .copies import Copies
from .image import ATTACHED_FILE, IMAGE_FILE
from .libnfs import Connection
from .trash import Trash

log = logging.getLogger(__name__)


class NfsBackend(Backend[NfsConfig]):
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

    def __init__(self, name: str, config: NfsConfig, node: NodeInfo) -> None:
        super().__init__(name, config, node)
        self.access = Access(config)
        self.copies = Copies(name, self.access)
        self.trash = Trash(name, self.access, self.copies)
        self.attacher = Attacher(name, self.access, node)
        metrics.report_queue(name, "copies", self.copies.jobs.running)
        metrics.report_queue(name, "trash", lambda: self.trash.waiting)

    # -- both sides ----------------------------------------------------------------------
    def start(self) -> None:
        with self.access.conn() as conn:
            share.prepare(conn)
            if self.node.controller:  # a node plugin leaves tmp and the trash alone
                self.trash.start(conn)
            if self.node.serves_node:  # so that the controller can tell the node exists
                share.register_node(conn, self.node.node_id)

    def probe(self) -> None:
        with self.access.conn() as conn:
            conn.stat(share.META)

    # -- records <-> interface types -------------------------------------------------------
    def _volume(self, local_id: str, rec: share.VolumeRecord, conn: Connection | None = None
                ) -> Volume:
        """The interface's Volume; with `conn`, its condition and attachments too."""
        cond, published = None, tuple[Attachment, ...]()
        if conn is not None:
            present = conn.exists(f"/{rec.sub_dir}")
            cond = Condition(not present, "" if present else
                             f"directory {rec.sub_dir} is missing from "
                             f"{self.config.server}:{self.config.share}")
            published = tuple(Attachment.from_record(node, a) for node, a in
                              sorted(share.attachments(conn, local_id).items()))
        return Volume(
            local_id=local_id, name=rec.name, size=rec.size, parameters=rec.parameters,
            context=rec.context, condition=cond, block=rec.block,
            mutable_parameters=rec.mutable, published=published,
            source=Source(rec.source_kind, rec.source_id) if rec.source_kind else None,
        )

    # -- controller: volumes -------------------------------------------------------------
    def create_volume(self, request: VolumeRequest) -> Volume:
        settings = volumes.settings(self.config, request.parameters)
        # A VolumeAttributesClass's values at create win over the StorageClass's.
        volumes.check_mutable(request.mutable_parameters)
        settings.update(request.mutable_parameters)
        sub_dir = share.render_sub_dir(settings["subDir"], request.provisioner, request.name)
        local_id = ids.local_id_for_name(request.name)
        layout = settings["volumeLayout"]
        block = request.block
        with self.access.conn() as conn:
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
            with self.copies.claims:
                share.claim(conn, sub_dir, request.name, local_id,
                            self.config.abandonAfterSeconds)
            path = f"/{sub_dir}"
            parent = os.path.dirname(path)
            if parent != "/":
                conn.makedirs(parent, 0o755)
            copying = f"{share.VOLUMES}/{local_id}.copying"
            if source_path and self.copies.jobs.get(f"vol-{local_id}") is None:
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
            self.copies.wait(f"vol-{local_id}", source_path, path, layout == volumes.IMAGE,
                             f"copying {request.source.kind if request.source else ''} into "
                             f"volume {request.name!r}", held)
        if layout == volumes.IMAGE:
            with self.access.conn() as conn:
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
        with self.access.conn() as conn:
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

    def delete_volume(self, local_id: str, *, secrets: Secrets) -> None:
        with self.access.conn() as conn:
            rec = share.volume_record(conn, local_id)
            if rec is None:
                return
            nodes = sorted(share.attachments(conn, local_id))
            if nodes:
                raise errors.FailedPrecondition(
                    f"volume {rec.name!r} is published to node {nodes[0]!r}; unpublish it first")
            self.trash.dispose(conn, f"/{rec.sub_dir}", rec.on_delete)
            faults.point("nfs-delete-volume")
            # The record first: from then on a retried delete finds nothing to do, so it can
            # never touch a newer volume that takes the released subDir.
            share.remove(conn, f"{share.VOLUMES}/{local_id}.json")
            share.release(conn, rec.sub_dir, rec.name, local_id)

    def list_volumes(self, query: Query) -> Iterator[Volume]:
        with self.access.conn() as conn:
            found = []
            for local_id in ([query.local_id] if query.local_id
                             else share.ids(conn, share.VOLUMES)):
                rec = share.volume_record(conn, local_id)
                if rec is not None:
                    found.append(self._volume(local_id, rec, conn))
        yield from found

    def capacity(self, parameters: Mapping[str, str]) -> Capacity:
        with self.access.conn() as conn:
            return Capacity(available=conn.available())

    def capability_problem(self, capability: Capability, parameters: Mapping[str, str]
                           ) -> str | None:
        layout = parameters.get("volumeLayout", self.config.volumeLayout)
        return volumes.layout_problem(layout, capability)

    def update_volume(self, update: VolumeUpdate) -> tuple[int, bool]:
        """New mount settings are recorded: the node applies them at its next NodeStage.
        A directory has no size to grow: the new size is recorded, nothing else; an image
        grows here and its filesystem on the node."""
        volumes.check_mutable(update.mutable_parameters)
        with self.access.conn() as conn:
            rec = self._record(conn, update.local_id)
            if rec.layout == volumes.IMAGE and update.size:
                volumes.grow_image(conn, f"/{rec.sub_dir}/{IMAGE_FILE}", update.size)
            if update.size > rec.size or update.mutable_parameters:
                rec.size = max(rec.size, update.size)
                rec.mutable.update(update.mutable_parameters)
                share.save_volume(conn, update.local_id, rec)
            return rec.size, rec.layout == volumes.IMAGE and update.size > 0

    # -- controller: snapshots -----------------------------------------------------------
    @staticmethod
    def _snapshot_ready(conn: Connection, local_id: str) -> bool:
        return conn.exists(f"{share.SNAPSHOTS}/{local_id}")

    def _snapshot(self, local_id: str, rec: share.SnapshotRecord, ready: bool) -> Snapshot:
        return Snapshot(local_id=local_id, name=rec.name, source_volume=rec.source_volume,
                        size=rec.size, created_at=rec.created, ready=ready)

    def create_snapshot(self, request: SnapshotRequest) -> Snapshot:
        name, source_volume = request.name, request.source_volume
        local_id = ids.local_id_for_name(name)
        with self.access.conn() as conn:
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
            if volume is not None and self.copies.jobs.get(key) is None:
                # A copy (re)starting: the volume may have been published since the first try.
                volumes.not_attached(conn, source_volume, volume)
        if volume is None:
            raise errors.FailedPrecondition(
                f"the copy of snapshot {name!r} did not finish and its volume is gone; "
                "delete the snapshot")
        image = volume.layout == volumes.IMAGE
        job = self.copies.jobs.start(key, lambda job: self.copies.copy(
            job, f"/{volume.sub_dir}", f"{share.SNAPSHOTS}/{local_id}", image), source_volume)
        if job.done.wait(min(self.config.copyWaitSeconds, 1)):
            self.copies.jobs.forget(key)
            self.copies.raise_failure(job)
            return self._snapshot(local_id, rec, True)
        return self._snapshot(local_id, rec, False)

    def delete_snapshot(self, local_id: str, *, secrets: Secrets) -> None:
        if not self.copies.jobs.cancel(f"snap-{local_id}", wait=self.config.timeoutSeconds):
            raise errors.Aborted(f"the copy of snapshot {self.name}:{local_id} is still "
                                 "stopping; retry the delete")
        with self.access.conn() as conn:
            share.to_trash(conn, f"{share.SNAPSHOTS}/{local_id}")
            share.to_trash(conn, f"{share.TMP}/snap-{local_id}")
            share.remove(conn, share.data_map_path(f"{share.SNAPSHOTS}/{local_id}"))
            share.remove(conn, f"{share.SNAPSHOTS}/{local_id}.json")
        self.trash.wake()

    def list_snapshots(self, query: Query) -> Iterator[Snapshot]:
        with self.access.conn() as conn:
            found = []
            for local_id in ([query.local_id] if query.local_id
                             else share.ids(conn, share.SNAPSHOTS)):
                rec = share.snapshot_record(conn, local_id)
                if rec is not None and query.wants(local_id, rec.source_volume):
                    found.append(self._snapshot(local_id, rec,
                                                self._snapshot_ready(conn, local_id)))
        yield from found

    def block_map(self, query: BlockQuery) -> BlockMap:
        # The spec's answer for storage that cannot track changes. NFSv3 has no way to ask
        # where a file's data lies, and libnfs (4.0) sends no NFSv4.2 SEEK; a snapshot copy's
        # data map (share.py) says where its data was, not what changed.
        raise errors.FailedPrecondition(
            f"backend {self.name!r} (nfs) cannot tell which blocks of an image changed or hold "
            f"data: the NFS client library has no NFSv4.2 SEEK; take a full backup instead")

    # -- attach ------------------------------------------------------------------------------
    # Recorded for every volume, so the services can hold a single-node directory volume to
    # one node too and tell a publish with another capability apart; only an image's node
    # checks it at NodeStage (a directory is an NFS mount any node may make).
    def _record(self, conn: Connection, local_id: str) -> share.VolumeRecord:
        rec = share.volume_record(conn, local_id)
        if rec is None:
            raise errors.NotFound(f"volume {self.name}:{local_id} does not exist")
        return rec

    def attach(self, local_id: str, attachment: Attachment, *, secrets: Secrets
               ) -> Mapping[str, str]:
        with self.access.conn() as conn:
            rec = self._record(conn, local_id)
            if self.copies.jobs.copying_from(local_id):
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
        with self.access.conn() as conn:
            self._record(conn, local_id)
            nodes = share.attachments(conn, local_id)
            kept = {n: a for n, a in nodes.items() if node_id and n != node_id}
            if kept != nodes:
                share.save_attachments(conn, local_id, kept)

    def node_known(self, node_id: str, *, secrets: Secrets) -> bool:
        with self.access.conn() as conn:
            return share.node_registered(conn, node_id)

    # -- node: attach.py ---------------------------------------------------------------------
    def stage(self, request: StageRequest) -> None:
        self.attacher.stage(request)

    def unstage(self, local_id: str, staging_path: str) -> None:
        self.attacher.unstage(local_id, staging_path)

    def owns_mount(self, local_id: str, path: str | None) -> bool:
        return path is None or self.attacher.owns(local_id, path)

    def node_expand(self, request: NodeExpandRequest) -> int:
        return self.attacher.expand(request)

    def node_condition(self, local_id: str, volume_path: str) -> Condition:
        return self.attacher.condition(local_id, volume_path)
