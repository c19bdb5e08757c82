"""Ceph RBD backend: volumes and snapshots as RBD images, through librados/librbd."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Mapping
from typing import Any

from ... import errors, faults, ids, metrics
from ...node.extents import coalesce
from ..base import (
    NO_SECRETS,
    SINGLE_NODE_MODES,
    AccessMode,
    Attachment,
    Backend,
    BlockMap,
    BlockQuery,
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
from ..ceph_cluster import Cluster, Credentials, credentials
from . import images
from .attach import Attacher
from .config import RbdConfig
from .images import RESTORE_SNAP, ImageRecord

MiB = 1 << 20
DIFF_WINDOW = 1 << 30  # bytes diffed per librbd call


class RbdBackend(Backend[RbdConfig]):
    type_name = "rbd"
    Config = RbdConfig
    features = Features(
        access_modes=SINGLE_NODE_MODES | {AccessMode.MULTI_NODE_READER_ONLY},
        block=True,
        parameters=frozenset({"imageFeatures"}),
        mutable_parameters=frozenset(images.QOS_KEYS),
        snapshots=True,
        clones=True,
        expansion=Expansion.ONLINE,
        volume_condition=True,
        # Single-node images are held to one node (ceph-csi has no such guard).
        attach=True,
        changed_blocks=True,
    )

    def __init__(self, name: str, config: RbdConfig, node: NodeInfo) -> None:
        super().__init__(name, config, node)
        self.cluster = Cluster(config, config.pool, config.radosNamespace)
        self.attacher = Attacher(config)
        self.purger = images.Purger(self.cluster.call,
                                    (config.volumeNamePrefix, config.snapshotNamePrefix))
        metrics.report_queue(name, "purge", self.purger.waiting)
        self._sweep_later: set[Credentials] = set()
        self._swept: set[Credentials] = set()

    # -- plumbing ------------------------------------------------------------------------
    def _creds(self, secrets: Secrets) -> Credentials:
        creds = credentials(self.config, secrets)
        if not self.cluster.known(creds):
            # First use of these credentials: images a crash (or a restart) left in the trash
            # are swept with them, as request secrets may be the only credentials there are.
            self._sweep_later.add(creds)
        return creds

    def _call(self, secrets: Secrets, what: str, fn: Any) -> Any:
        return self._run(self._creds(secrets), what, fn)

    def _run(self, creds: Credentials, what: str, fn: Any) -> Any:
        result = self.cluster.call(creds, what, fn)
        self._sweep_new()
        return result

    def _sweep_new(self) -> None:
        for creds in list(self._sweep_later - self._swept):
            self._swept.add(creds)
            try:
                self.purger.sweep(creds)
            except errors.CsiError:
                self._swept.discard(creds)

    def _vol(self, local_id: str) -> str:
        return self.config.volumeNamePrefix + local_id

    def _snap(self, local_id: str) -> str:
        return self.config.snapshotNamePrefix + local_id

    def _volume(self, local_id: str, rec: ImageRecord) -> Volume:
        kind, _, source_id = rec.source.partition(":")
        return Volume(
            local_id=local_id, name=rec.name, size=rec.size, parameters=rec.parameters,
            source=Source(kind, source_id) if kind else None, block=rec.block,
            mutable_parameters=rec.qos, condition=Condition(False, ""),
            context={"pool": self.config.pool, "image": rec.image},
            published=tuple(Attachment.from_record(n, a)
                            for n, a in sorted(rec.attached.items())),
        )

    @staticmethod
    def _snapshot(local_id: str, rec: ImageRecord) -> Snapshot:
        return Snapshot(local_id=local_id, name=rec.name, source_volume=rec.source,
                        size=rec.size, created_at=rec.created)

    def start(self) -> None:
        # A node says it exists (ControllerPublish checks), where it has credentials to.
        if self.node.serves_node and self._nodes_register():
            self._call(NO_SECRETS, "registering the node",
                       lambda ctx: ctx.write_full(_NODE_OBJECT + self.node.node_id, b""))

    def probe(self) -> None:
        try:
            import rados  # noqa: F401
            import rbd  # noqa: F401
        except ImportError:
            raise errors.Unavailable(
                "the Ceph Python bindings are missing: install python3-rados and python3-rbd"
            ) from None
        if self.config.userID and self.config.userKeyFile:
            self._call(NO_SECRETS, "checking the pool", lambda ctx: None)

    # -- volumes -------------------------------------------------------------------------
    def create_volume(self, request: VolumeRequest) -> Volume:
        local_id = ids.local_id_for_name(request.name)
        image = self._vol(local_id)
        feature_names = request.parameters.get("imageFeatures", self.config.imageFeatures)

        self._check_qos(request.mutable_parameters)

        def create(ctx: Any) -> ImageRecord:
            import rbd

            bits = images.features(rbd.RBD(), feature_names)
            rec = ImageRecord(image=image, name=request.name, size=request.size,
                              parameters=dict(request.parameters),
                              block=request.block)
            for _ in range(2):
                try:  # the common case first: a new name, no read before the create
                    if request.source is None:
                        rec.size = _round(request.size, request.limit)
                        rbd.RBD().create(ctx, image, rec.size, old_format=False, features=bits)
                    else:
                        self._clone_from(ctx, request, rec, bits)
                    break
                except rbd.ImageExists:
                    found = images.read(ctx, image)
                    if isinstance(found, ImageRecord):
                        return found  # a retry of a create that completed
                    if found is False:  # a crashed attempt: start again
                        self._discard(ctx, creds, image)
            else:
                raise errors.Aborted(f"image {image} keeps appearing; another create runs?")
            faults.point("create-volume")
            if request.mutable_parameters:  # from a VolumeAttributesClass: they win
                with rbd.Image(ctx, image) as img:
                    for key, value in request.mutable_parameters.items():
                        img.metadata_set(f"conf_{key}", value)
            if request.source is not None:
                with rbd.Image(ctx, image) as img:
                    if img.size() < rec.size:
                        img.resize(rec.size)
                    if rec.depth > self.config.maxCloneDepth:
                        img.flatten()
                        rec.depth = 0
            images.complete(ctx, rec)
            return rec

        creds = self._creds(request.secrets)
        rec = self._run(creds, f"creating image {image}", create)
        return self._volume(local_id, rec)

    def _discard(self, ctx: Any, creds: Credentials, image: str) -> None:
        iid = images.to_trash(ctx, image)
        if iid is not None:
            self.purger.add(creds, iid)

    def _clone_from(self, ctx: Any, request: VolumeRequest, rec: ImageRecord, bits: int) -> None:
        import rbd

        assert request.source is not None
        kind, source_id = request.source.kind, request.source.local_id
        parent = self._snap(source_id) if kind == "snapshot" else self._vol(source_id)
        found = images.read(ctx, parent)
        if not isinstance(found, ImageRecord):
            raise errors.NotFound(f"source {kind} {self.name}:{source_id} does not exist")
        rec.size = _round(max(request.size, found.size), request.limit)
        rec.source, rec.depth = f"{kind}:{source_id}", found.depth + 1
        if kind == "snapshot":
            images.clone(ctx, parent, RESTORE_SNAP, rec.image, bits)
            return
        # A volume: snapshot it for the clone, then drop the snapshot (clone v2 keeps it in the
        # trash namespace while the clone needs it).
        snap = f"clone-{rec.image}"
        with rbd.Image(ctx, parent) as img:
            if snap not in {s["name"] for s in img.list_snaps()}:
                img.create_snap(snap)
        images.clone(ctx, parent, snap, rec.image, bits)
        with rbd.Image(ctx, parent) as img:
            img.remove_snap(snap)

    def delete_volume(self, local_id: str, *, secrets: Secrets) -> None:
        image = self._vol(local_id)
        creds = self._creds(secrets)

        def delete(ctx: Any) -> None:
            nodes = sorted(images.attachments(ctx, image))
            if nodes:
                raise errors.FailedPrecondition(
                    f"image {image} is published to node {nodes[0]!r}; unpublish it first")
            # Our own client's watches (the purger detaching a clone) are not an attachment.
            busy = images.watchers(ctx, image, ignore=self.cluster.instance_ids())
            if busy:
                raise errors.FailedPrecondition(
                    f"image {image} is still attached by {', '.join(busy)}; unstage it first")
            self._discard(ctx, creds, image)
            faults.point("delete-volume")

        self._run(creds, f"deleting image {image}", delete)

    def _list(self, prefix: str, query: Query) -> list[tuple[str, ImageRecord]]:
        """(local ID, record) of the images `query` matches."""
        import rbd

        def scan(ctx: Any) -> list[tuple[str, ImageRecord]]:
            out = []
            names = ([prefix + query.local_id] if query.local_id
                     else sorted(i for i in rbd.RBD().list(ctx) if i.startswith(prefix)))
            for image in names:
                found = images.read(ctx, image)
                if isinstance(found, ImageRecord) and query.wants(image[len(prefix):],
                                                                   found.source):
                    out.append((image[len(prefix):], found))
            return out

        return self._call(query.secrets, "listing images", scan)  # type: ignore[no-any-return]

    def list_volumes(self, query: Query) -> Iterator[Volume]:
        return (self._volume(i, r) for i, r in self._list(self.config.volumeNamePrefix, query))

    def capacity(self, parameters: Mapping[str, str]) -> Capacity:
        creds = self._creds(NO_SECRETS)
        ret, out = self.cluster.mon_command(creds, {"prefix": "df", "format": "json"},
                                            "reading the pool's free space")
        if ret != 0:
            raise errors.Unavailable(f"ceph df failed ({ret}); does {creds.user} have mon 'r'?")
        pools = {p["name"]: p["stats"] for p in json.loads(out)["pools"]}
        if not pools:
            raise errors.Unavailable("the cluster reports no pool statistics (no ceph-mgr?)")
        if self.config.pool not in pools:
            raise errors.InvalidArgument(f"pool {self.config.pool!r} does not exist")
        available = int(pools[self.config.pool]["max_avail"])
        return Capacity(available=available, maximum_volume_size=available)

    def update_volume(self, update: VolumeUpdate) -> tuple[int, bool]:
        if update.mutable_parameters:
            self._modify(update.local_id, update.mutable_parameters, update.secrets)
        return self._expand(update.local_id, update.size, update.secrets)

    def _expand(self, local_id: str, size: int, secrets: Secrets) -> tuple[int, bool]:
        import rbd

        image = self._vol(local_id)

        def grow(ctx: Any) -> tuple[int, bool]:
            found = images.read(ctx, image)
            if not isinstance(found, ImageRecord):
                raise errors.NotFound(f"volume {self.name}:{local_id} does not exist")
            target = _round(size, 0)
            if target <= found.size:
                return found.size, False
            with rbd.Image(ctx, image) as img:
                img.resize(target)
            return target, True

        return self._call(secrets, f"resizing image {image}", grow)  # type: ignore[no-any-return]

    @staticmethod
    def _check_qos(mutable_parameters: Mapping[str, str]) -> None:
        for key, value in mutable_parameters.items():
            if key not in images.QOS_KEYS or not value.isdigit():
                raise errors.InvalidArgument(
                    f"{key}={value!r}: mutable parameters are {', '.join(images.QOS_KEYS)}, "
                    "each a whole number (0 = unlimited)")

    def _modify(self, local_id: str, mutable_parameters: Mapping[str, str], secrets: Secrets
                ) -> None:
        import rbd

        self._check_qos(mutable_parameters)
        image = self._vol(local_id)

        def apply(ctx: Any) -> None:
            with rbd.Image(ctx, image) as img:
                for key, value in mutable_parameters.items():
                    # librbd reads per-image overrides of its options from conf_* metadata.
                    img.metadata_set(f"conf_{key}", value)

        self._call(secrets, f"setting QoS on image {image}", apply)

    # -- snapshots -----------------------------------------------------------------------
    def create_snapshot(self, request: SnapshotRequest) -> Snapshot:
        import rbd

        name, source_volume = request.name, request.source_volume
        local_id = ids.local_id_for_name(name)
        image, source = self._snap(local_id), self._vol(source_volume)
        snap = f"snap-{image}"

        def take(ctx: Any) -> ImageRecord:
            found = images.read(ctx, image)
            if isinstance(found, ImageRecord):
                return found
            if found is False:
                self._discard(ctx, creds, image)
            vol = images.read(ctx, source)
            if not isinstance(vol, ImageRecord):
                raise errors.NotFound(f"volume {self.name}:{source_volume} does not exist")
            with rbd.Image(ctx, source) as img:
                if snap not in {s["name"] for s in img.list_snaps()}:
                    img.create_snap(snap)
                bits = img.features()
            images.clone(ctx, source, snap, image, bits)
            rec = ImageRecord(image=image, name=name, size=vol.size, source=source_volume,
                              depth=vol.depth + 1, created=time.time())
            faults.point("create-snapshot")
            with rbd.Image(ctx, image) as img:
                if rec.depth > self.config.maxCloneDepth:
                    img.flatten()
                    rec.depth = 0
                img.create_snap(RESTORE_SNAP)
            # The volume keeps `snap` (a user snapshot) while the CSI snapshot lives: deltas
            # between two CSI snapshots are librbd's diff between their points on the volume.
            images.complete(ctx, rec)
            return rec

        creds = self._creds(request.secrets)
        rec = self._run(creds, f"snapshotting image {source}", take)
        return self._snapshot(local_id, rec)

    def delete_snapshot(self, local_id: str, *, secrets: Secrets) -> None:
        import rbd

        image = self._snap(local_id)
        creds = self._creds(secrets)

        def delete(ctx: Any) -> None:
            rec = images.read(ctx, image)
            if isinstance(rec, ImageRecord):  # its point on the volume first: a retry finds it
                with contextlib.suppress(rbd.ImageNotFound), \
                        rbd.Image(ctx, self._vol(rec.source)) as img:
                    if _user_snap(img, f"snap-{image}"):
                        img.remove_snap(f"snap-{image}")  # clone v2: to the trash namespace
            self._discard(ctx, creds, image)

        self._run(creds, f"deleting snapshot image {image}", delete)

    # -- changed block tracking ----------------------------------------------------------
    def block_map(self, query: BlockQuery) -> BlockMap:
        """librbd's diff_iterate, exact extents: allocation from the snapshot image at its
        `restore` snapshot (its parent's data included); a delta between the two points the
        snapshots left on their volume (see create_snapshot), read in windows of DIFF_WINDOW
        so a resumed stream starts near its offset and memory stays bounded."""
        import rbd

        creds = self._creds(query.secrets)
        target = self._snap(query.snapshot)

        def plan(ctx: Any) -> tuple[int, str, str, str | None]:
            rec = images.read(ctx, target)
            if not isinstance(rec, ImageRecord):
                raise errors.NotFound(f"snapshot {self.name}:{query.snapshot} does not exist")
            if not query.base:
                return rec.size, target, RESTORE_SNAP, None
            volume = self._vol(rec.source)
            try:
                with rbd.Image(ctx, volume, read_only=True) as img:
                    points = [_user_snap(img, f"snap-{self._snap(i)}")
                              for i in (query.base, query.snapshot)]
            except rbd.ImageNotFound:
                raise errors.FailedPrecondition(
                    f"volume {self.name}:{rec.source} is deleted, and with it the points its "
                    f"snapshots were taken at; take a full backup of {self.name}:"
                    f"{query.snapshot}") from None
            if not all(points):
                raise errors.FailedPrecondition(
                    f"snapshot {self.name}:{query.base if not points[0] else query.snapshot} "
                    f"was taken before Berth kept snapshot points on the volume, so its "
                    f"changes cannot be told; take a full backup")
            return (rec.size, volume, f"snap-{target}", f"snap-{self._snap(query.base)}")

        size, image, at, since = self._run(creds, f"reading snapshot {target}", plan)

        def window(ctx: Any, offset: int, length: int) -> list[tuple[int, int]]:
            found: list[tuple[int, int]] = []

            def seen(o: int, n: int, exists: bool) -> int:
                if exists or since is not None:  # a range discarded since `since` changed too
                    found.append((o, n))
                return 0

            with rbd.Image(ctx, image, snapshot=at, read_only=True) as img:
                img.diff_iterate(offset, length, since, seen, include_parent=True,
                                 whole_object=False)
            return sorted(found)

        def ranges() -> Iterator[tuple[int, int]]:
            offset = query.start // DIFF_WINDOW * DIFF_WINDOW
            while offset < size:
                length = min(DIFF_WINDOW, size - offset)
                yield from self._run(creds, f"diffing {image}@{at}",
                                     lambda ctx, o=offset, n=length: window(ctx, o, n))
                offset += length

        return BlockMap(capacity=size, ranges=coalesce(ranges()))

    def list_snapshots(self, query: Query) -> Iterator[Snapshot]:
        return (self._snapshot(i, r) for i, r in self._list(self.config.snapshotNamePrefix, query))

    # -- node ----------------------------------------------------------------------------
    # -- attach --------------------------------------------------------------------------
    # Attachments live in the image's metadata; nodes register as an object each in the pool,
    # which needs credentials in the config on the nodes. Without them no node can register,
    # and every node ID the CO names is taken as known.
    def _nodes_register(self) -> bool:
        return bool(self.config.userID and self.config.userKeyFile)

    def attach(self, local_id: str, attachment: Attachment, *, secrets: Secrets
               ) -> Mapping[str, str]:
        image = self._vol(local_id)

        def record(ctx: Any) -> None:
            nodes = images.attachments(ctx, image)
            nodes[attachment.node_id] = attachment.to_record()
            images.save_attachments(ctx, image, nodes)

        self._call(secrets, f"attaching image {image}", record)
        return {}

    def detach(self, local_id: str, node_id: str, *, secrets: Secrets) -> None:
        image = self._vol(local_id)

        def record(ctx: Any) -> None:
            nodes = images.attachments(ctx, image)
            kept = {n: a for n, a in nodes.items() if node_id and n != node_id}
            if kept != nodes:
                images.save_attachments(ctx, image, kept)

        self._call(secrets, f"detaching image {image}", record)

    def node_known(self, node_id: str, *, secrets: Secrets) -> bool:
        import rados

        if not self._nodes_register():
            return True

        def look(ctx: Any) -> bool:
            try:
                ctx.stat(_NODE_OBJECT + node_id)
            except rados.ObjectNotFound:
                return False
            return True

        return bool(self._call(secrets, "looking up the node", look))

    def stage(self, request: StageRequest) -> None:
        self.attacher.stage(self._vol(request.local_id), request.staging_path,
                            request.capability, self._creds(request.secrets))

    def unstage(self, local_id: str, staging_path: str) -> None:
        self.attacher.unstage(self._vol(local_id), staging_path)

    def owns_mount(self, local_id: str, path: str | None) -> bool:
        return path is None or self.attacher.owns(self._vol(local_id), path)

    def node_expand(self, request: NodeExpandRequest) -> int:
        return self.attacher.expand(self._vol(request.local_id), request.volume_path,
                                    request.required)

    def node_condition(self, local_id: str, volume_path: str) -> Condition:
        return self.attacher.condition(self._vol(local_id), volume_path)


def _round(size: int, limit: int) -> int:
    """Whole MiB (filesystems and loop devices want aligned sizes), within `limit`."""
    rounded = max(MiB, -(-size // MiB) * MiB)
    if limit and rounded > limit:
        raise errors.OutOfRange(f"RBD volumes come in whole MiB: {rounded} exceeds limit {limit}")
    return rounded


_NODE_OBJECT = "berth.node."


def _user_snap(img: Any, name: str) -> bool:
    """Whether the open image has a user-namespace snapshot `name` (the points CSI snapshots
    leave; clone v2 keeps removed ones with clones in the trash namespace)."""
    import rbd

    return any(s["name"] == name and s.get("namespace", rbd.RBD_SNAP_NAMESPACE_TYPE_USER)
               == rbd.RBD_SNAP_NAMESPACE_TYPE_USER for s in img.list_snaps())
