"""hostPath backend: volumes and snapshots on the node's own filesystem (see store.py)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
from collections.abc import Iterator, Mapping

from ... import errors, ids
from ...node import copying, extents, filesystems, loop, mounts
from ..base import (
    SINGLE_NODE_MODES,
    Backend,
    BlockMap,
    BlockQuery,
    Capacity,
    Condition,
    Expansion,
    Features,
    GroupSnapshot,
    GroupSnapshotRequest,
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
from .attach import Attacher
from .config import HostPathConfig
from .store import BLOCK, DIRECTORY, IMAGE, IMAGE_FILE, XATTR, GroupRecord, Record, Store

MiB = 1 << 20
MUTABLE = {"readOnly": ("true", "false")}


class HostPathBackend(Backend[HostPathConfig]):
    type_name = "hostpath"
    Config = HostPathConfig
    features = Features(
        access_modes=SINGLE_NODE_MODES,
        block=True,
        node_local=True,
        parameters=frozenset({"layout"}),
        mutable_parameters=frozenset(MUTABLE),
        snapshots=True,
        clones=True,
        group_snapshots=True,
        expansion=Expansion.ONLINE,
        volume_condition=True,
        changed_blocks=True,
    )

    def __init__(self, name: str, config: HostPathConfig, node: NodeInfo) -> None:
        super().__init__(name, config, node)
        self.default_volume_size = config.defaultVolumeSize
        self.store = Store(config.path)
        self.attacher = Attacher(self.store)
        self._sizes: dict[str, int] = {}
        self._sizes_lock = threading.Lock()
        self._shares_blocks: bool | None = None  # reflinks in the store? (probed on first copy)

    # -- identity ------------------------------------------------------------------------
    def probe(self) -> None:
        if not os.access(self.store.volumes, os.W_OK):
            raise errors.Unavailable(
                f"hostpath backend {self.name!r}: {self.store.volumes} is not writable"
            )

    def start(self) -> None:
        try:
            self.store.prepare()
        except OSError as exc:
            raise errors.Unavailable(
                f"hostpath backend {self.name!r} cannot use {self.store.root}: {exc.strerror}"
            ) from exc
        try:  # records are extended attributes: say so now, not at the first CreateVolume
            os.setxattr(self.store.volumes, XATTR, b"{}")
            os.removexattr(self.store.volumes, XATTR)
        except OSError as exc:
            hint = {errno.EPERM: " (trusted.* attributes need CAP_SYS_ADMIN: run the driver "
                                 "privileged, or as a non-root user, which uses user.*)",
                    errno.ENOTSUP: " (the filesystem takes no extended attributes)"
                    }.get(exc.errno or 0, "")
            raise errors.Unavailable(
                f"hostpath backend {self.name!r} cannot set the extended attribute {XATTR} in "
                f"{self.store.root}: {exc.strerror}{hint}") from exc
        with self._sizes_lock:
            self._sizes = {i: r.size for i, r in self._records(self.store.volumes)}
        # A kill during a snapshot copy leaves the source frozen: writers would hang forever.
        for local_id, rec in self._records(self.store.volumes):
            self.attacher.thaw_leftover(local_id, rec)

    # -- records <-> interface types -------------------------------------------------------
    def _records(self, kind_dir: str) -> Iterator[tuple[str, Record]]:
        for local_id in self.store.ids(kind_dir):
            rec = self.store.read(kind_dir, local_id)
            if rec is not None:
                yield local_id, rec

    def _volume(self, local_id: str, rec: Record, condition: bool = True) -> Volume:
        cond = None
        if condition:
            payload = self.store.payload(self.store.volumes, local_id, rec)
            cond = (Condition(True, f"backing {os.path.basename(payload)} is missing")
                    if not os.path.exists(payload) else Condition(False, ""))
        return Volume(
            local_id=local_id, name=rec.name, size=rec.size, parameters=rec.parameters,
            source=Source(rec.source_kind, rec.source_id) if rec.source_kind else None,
            block=rec.layout == BLOCK, mutable_parameters=rec.mutable, condition=cond,
            context={"layout": rec.layout, **({"fsType": rec.fs_type} if rec.fs_type else {})},
        )

    @staticmethod
    def _snapshot(local_id: str, rec: Record) -> Snapshot:
        return Snapshot(local_id=local_id, name=rec.name, source_volume=rec.source_id,
                        size=rec.size, created_at=rec.created, group=rec.group)

    def _existing_volume(self, local_id: str) -> Record:
        rec = self.store.read(self.store.volumes, local_id)
        if rec is None:
            raise errors.NotFound(f"volume {self.name}:{local_id} does not exist")
        return rec

    # -- capacity ------------------------------------------------------------------------
    def _available(self) -> int:
        if self.config.capacity is not None:
            with self._sizes_lock:
                used = sum(self._sizes.values())
            return max(0, self.config.capacity - used)
        st = os.statvfs(self.store.volumes)
        return st.f_bavail * st.f_frsize

    def _reserve(self, local_id: str, size: int) -> int:
        """Book `size` bytes for the volume (check and book in one step, so concurrent creates
        cannot overcommit); returns what was booked before, to give back on failure."""
        with self._sizes_lock:
            before = self._sizes.get(local_id, 0)
            if self.config.capacity is not None:
                left = self.config.capacity - sum(self._sizes.values())
            else:
                st = os.statvfs(self.store.volumes)
                left = st.f_bavail * st.f_frsize
            if size - before > left:
                raise errors.ResourceExhausted(
                    f"hostpath backend {self.name!r} has {max(0, left)} bytes left; "
                    f"{size - before} more requested")
            self._sizes[local_id] = size
            return before

    def _unreserve(self, local_id: str, before: int) -> None:
        with self._sizes_lock:
            if before:
                self._sizes[local_id] = before
            else:
                self._sizes.pop(local_id, None)

    def capacity(self, parameters: Mapping[str, str]) -> Capacity:
        available = self._available()
        return Capacity(available=available, maximum_volume_size=available)

    # -- volumes -------------------------------------------------------------------------
    def _layout_for(self, request: VolumeRequest) -> tuple[str, str]:
        if request.block:
            return BLOCK, ""
        layout = request.parameters.get("layout", self.config.layout)
        if layout not in (DIRECTORY, IMAGE):
            raise errors.InvalidArgument(
                f"parameter layout={layout!r} is not one of: {DIRECTORY}, {IMAGE}"
            )
        if layout == DIRECTORY:
            return DIRECTORY, ""
        fs_types = {c.fs_type for c in request.capabilities if c.fs_type}
        if len(fs_types) > 1:
            raise errors.InvalidArgument(f"conflicting filesystem types {sorted(fs_types)}")
        fs_type = fs_types.pop() if fs_types else self.config.fsType
        filesystems.check_supported(fs_type)
        return IMAGE, fs_type

    @staticmethod
    def _sized(layout: str, fs_type: str, size: int, limit: int) -> int:
        """Round to what the layout can hold: whole MiB, and a filesystem's minimum."""
        if layout != DIRECTORY:
            size = max(size, filesystems.MINIMUM_SIZE.get(fs_type, MiB))
            size = -(-size // MiB) * MiB
        if limit and size > limit:
            raise errors.OutOfRange(
                f"a {layout} volume{' of ' + fs_type if fs_type else ''} needs at least {size} "
                f"bytes; limit_bytes is {limit}"
            )
        return size

    def _source(self, source: Source) -> tuple[str, Record]:
        kind_dir = self.store.snapshots if source.kind == "snapshot" else self.store.volumes
        rec = self.store.read(kind_dir, source.local_id)
        if rec is None:
            raise errors.NotFound(f"source {source.kind} {self.name}:{source.local_id} "
                                  "does not exist")
        return kind_dir, rec

    def create_volume(self, request: VolumeRequest) -> Volume:
        local_id = ids.local_id_for_name(request.name)
        existing = self.store.read(self.store.volumes, local_id)
        if existing is not None:
            return self._volume(local_id, existing)
        self._check_mutable(request.mutable_parameters)
        layout, fs_type = self._layout_for(request)
        size = request.size
        source = None
        if request.source is not None:
            kind_dir, source = self._source(request.source)
            if source.layout != layout:
                raise errors.InvalidArgument(
                    f"the source {request.source.kind} is a {source.layout} volume; "
                    f"a {layout} volume cannot be made from it"
                )
            fs_type = source.fs_type
            size = max(size, source.size)
        size = self._sized(layout, fs_type, size, request.limit)
        before = self._reserve(local_id, size)
        rec = Record(name=request.name, size=size, layout=layout, fs_type=fs_type,
                     parameters=dict(request.parameters), mutable=dict(request.mutable_parameters))
        scratch = self.store.scratch(local_id)
        try:
            if request.source is not None and source is not None:
                rec.source_kind, rec.source_id = request.source.kind, request.source.local_id
                self._copy_payload(kind_dir, request.source.local_id, source, scratch)
            elif layout != DIRECTORY:
                open(os.path.join(scratch, IMAGE_FILE), "x").close()
            if layout == DIRECTORY:
                # World-writable like other hostPath drivers: pods run as arbitrary users.
                os.chmod(scratch, 0o777)
            else:
                os.truncate(os.path.join(scratch, IMAGE_FILE), size)
            self.store.commit(scratch, self.store.volumes, local_id, rec, "create-volume")
        except BaseException as exc:
            self._unreserve(local_id, before)
            if isinstance(exc, OSError):
                raise _os_error("could not create the volume", exc) from exc
            raise
        finally:
            if os.path.lexists(scratch):  # not committed: an error came first
                shutil.rmtree(scratch, ignore_errors=True)
        return self._volume(local_id, rec)

    def _reflinks(self) -> bool | None:
        if self._shares_blocks is None:
            try:
                probe = self.store.scratch("reflink-probe")
            except OSError:  # a full filesystem: no answer yet, ask again next time
                return None
            try:
                self._shares_blocks = copying.reflinks(probe)
            finally:
                shutil.rmtree(probe, ignore_errors=True)
        return self._shares_blocks

    def _check_room(self, sources: list[tuple[str, str, Record]]) -> None:
        """ResourceExhausted, before copying anything, when the data of `sources` (kind_dir,
        local_id, record) cannot fit in the free space. Copies that share blocks (reflinks)
        need next to none, so only plain copies are checked; running out anyway (of inodes,
        or to a concurrent writer) is ENOSPC during the copy, which ends the same way."""
        if self._reflinks():
            return
        need = sum(copying.allocated_bytes(self.store.payload(kind_dir, local_id, rec))
                   for kind_dir, local_id, rec in sources)
        st = os.statvfs(self.store.tmp)
        free = st.f_bavail * st.f_frsize
        if need > free:
            raise errors.ResourceExhausted(
                f"hostpath backend {self.name!r}: the copy needs about {need} bytes and "
                f"{self.store.root} has {free} free")

    def _copy_payload(self, kind_dir: str, local_id: str, rec: Record, scratch: str,
                      alone: bool = True) -> None:
        """Copy an object's payload into `scratch`. A member of a group snapshot is not
        `alone`: the room for all members was checked, and their volumes frozen, at once."""
        source = self.store.payload(kind_dir, local_id, rec)
        if alone:
            self._check_room([(kind_dir, local_id, rec)])
        freeze = alone and kind_dir == self.store.volumes
        with self.attacher.frozen(local_id, rec) if freeze else contextlib.nullcontext():
            if rec.layout == DIRECTORY:
                copying.copy_tree(source, scratch)  # the record it copies is rewritten later
            else:
                copying.copy_file(source, os.path.join(scratch, IMAGE_FILE))

    def _in_use(self, local_id: str, rec: Record) -> str | None:
        """Where the volume is still mounted on this node, if anywhere."""
        payload = self.store.payload(self.store.volumes, local_id, rec)
        if rec.layout == DIRECTORY:
            suffix = f"/volumes/{local_id}"
            text = mounts.read_mountinfo()
            if suffix not in text:  # the common case, without parsing the table
                return None
            return next((e.mount_point for e in mounts.mount_table(text)
                         if e.root.endswith(suffix) and mounts.same_object(e.mount_point,
                                                                           payload)), None)
        devices = loop.attached(payload)
        # An image is in use where its loop device is mounted; a block volume where the device
        # node is bind-mounted (those entries show the node's path inside devtmpfs as root).
        nodes = {"/" + os.path.basename(d) for d in devices}
        return next((e.mount_point for e in mounts.mount_table() if e.source in devices
                     or (e.fs_type == "devtmpfs" and e.root in nodes)), None)

    def delete_volume(self, local_id: str, *, secrets: Secrets) -> None:
        rec = self.store.read(self.store.volumes, local_id)
        if rec is None:
            return
        where = self._in_use(local_id, rec)
        if where is not None:
            raise errors.FailedPrecondition(
                f"volume {self.name}:{local_id} is still in use at {where}; unpublish and "
                "unstage it first"
            )
        if rec.layout != DIRECTORY:
            loop.detach_all(self.store.payload(self.store.volumes, local_id, rec))
        if self.store.discard(self.store.volumes, local_id, "delete-volume"):
            with self._sizes_lock:
                self._sizes.pop(local_id, None)

    def list_volumes(self, query: Query) -> Iterator[Volume]:
        return (self._volume(i, r) for i, r in self._matching(self.store.volumes, query))

    def _matching(self, kind_dir: str, query: Query) -> Iterator[tuple[str, Record]]:
        if query.local_id:  # one record, not a scan
            rec = self.store.read(kind_dir, query.local_id)
            found = [] if rec is None else [(query.local_id, rec)]
        else:
            found = list(self._records(kind_dir))
        return ((i, r) for i, r in found if query.wants(i, r.source_id, r.group))

    def update_volume(self, update: VolumeUpdate) -> tuple[int, bool]:
        if update.mutable_parameters:
            self._modify(update.local_id, update.mutable_parameters)
        if update.size:
            return self._expand(update.local_id, update.size)
        return self._existing_volume(update.local_id).size, False

    def _expand(self, local_id: str, size: int) -> tuple[int, bool]:
        rec = self._existing_volume(local_id)
        size = self._sized(rec.layout, rec.fs_type, size, 0)
        if size <= rec.size:
            return rec.size, False
        before = self._reserve(local_id, size)
        try:
            if rec.layout != DIRECTORY:
                os.truncate(self.store.payload(self.store.volumes, local_id, rec), size)
            rec.size = size
            self.store.write_meta(self.store.path(self.store.volumes, local_id), rec)
        except OSError as exc:
            self._unreserve(local_id, before)
            raise _os_error("could not grow the volume", exc) from exc
        return size, rec.layout != DIRECTORY

    @staticmethod
    def _check_mutable(params: Mapping[str, str]) -> None:
        for key, value in params.items():
            if key not in MUTABLE:
                raise errors.InvalidArgument(
                    f"parameter {key!r} cannot be modified; mutable: {', '.join(MUTABLE)}"
                )
            if value not in MUTABLE[key]:
                raise errors.InvalidArgument(
                    f"{key}={value!r} is not one of {', '.join(MUTABLE[key])}"
                )

    def _modify(self, local_id: str, mutable_parameters: Mapping[str, str]) -> None:
        self._check_mutable(mutable_parameters)
        rec = self._existing_volume(local_id)
        rec.mutable.update(mutable_parameters)
        self.store.write_meta(self.store.path(self.store.volumes, local_id), rec)

    # -- snapshots -----------------------------------------------------------------------
    def _take_snapshot(self, local_id: str, name: str, volume_id: str, group: str = "") -> None:
        """Copy a volume into a new snapshot directory (caller holds any freeze)."""
        vol = self._existing_volume(volume_id)
        rec = Record(name=name, size=vol.size, layout=vol.layout, fs_type=vol.fs_type,
                     source_id=volume_id, group=group)
        scratch = ""
        try:
            scratch = self.store.scratch(local_id)
            self._copy_payload(self.store.volumes, volume_id, vol, scratch, alone=not group)
            self.store.commit(scratch, self.store.snapshots, local_id, rec, "create-snapshot")
        except OSError as exc:
            raise _os_error("could not take the snapshot", exc) from exc
        finally:
            if scratch and os.path.lexists(scratch):  # not committed: an error came first
                shutil.rmtree(scratch, ignore_errors=True)

    def create_snapshot(self, request: SnapshotRequest) -> Snapshot:
        local_id = ids.local_id_for_name(request.name)
        rec = self.store.read(self.store.snapshots, local_id)
        if rec is None:
            self._take_snapshot(local_id, request.name, request.source_volume)
            rec = self.store.read(self.store.snapshots, local_id)
            assert rec is not None
        return self._snapshot(local_id, rec)

    def delete_snapshot(self, local_id: str, *, secrets: Secrets) -> None:
        rec = self.store.read(self.store.snapshots, local_id)
        if rec is not None and rec.group:
            raise errors.FailedPrecondition(
                f"snapshot {self.name}:{local_id} belongs to group snapshot "
                f"{self.name}:{rec.group}; delete the group snapshot instead"
            )
        self.store.discard(self.store.snapshots, local_id, "delete-snapshot")

    def list_snapshots(self, query: Query) -> Iterator[Snapshot]:
        return (self._snapshot(i, r) for i, r in self._matching(self.store.snapshots, query))

    # -- changed block tracking ----------------------------------------------------------
    def _image_of(self, local_id: str) -> tuple[str, Record]:
        rec = self.store.read(self.store.snapshots, local_id)
        if rec is None:
            raise errors.NotFound(f"snapshot {self.name}:{local_id} does not exist")
        if rec.layout == DIRECTORY:
            raise errors.FailedPrecondition(
                f"snapshot {self.name}:{local_id} is of a directory volume, whose changes are "
                f"files rather than blocks; take a full backup of it instead")
        return self.store.payload(self.store.snapshots, local_id, rec), rec

    def block_map(self, query: BlockQuery) -> BlockMap:
        """From the snapshot files' extent maps (node/extents.py): reflink copies decide
        deltas from the maps alone; plain copies (ext4) compare the blocks both hold."""
        target, rec = self._image_of(query.snapshot)
        base = self._image_of(query.base)[0] if query.base else ""
        maps_decide = bool(self._reflinks())

        def ranges() -> Iterator[tuple[int, int]]:
            try:
                with open(target, "rb") as t:
                    if not base:
                        yield from extents.allocated(t.fileno(), rec.size, query.start)
                        return
                    with open(base, "rb") as b:
                        yield from extents.changed(b.fileno(), t.fileno(), rec.size,
                                                   maps_decide=maps_decide, start=query.start)
            except FileNotFoundError:
                raise errors.NotFound(f"snapshot {self.name}:{query.snapshot} or "
                                      f"{self.name}:{query.base} was deleted meanwhile") from None
            except OSError as exc:
                raise _os_error("could not read the snapshot's extent map", exc) from exc

        return BlockMap(capacity=rec.size, ranges=ranges())

    # -- group snapshots -----------------------------------------------------------------
    def _group(self, local_id: str, grec: GroupRecord) -> GroupSnapshot:
        members = []
        for member in grec.members:
            rec = self.store.read(self.store.snapshots, member)
            if rec is not None:
                members.append(self._snapshot(member, rec))
        return GroupSnapshot(local_id=local_id, name=grec.name, snapshots=tuple(members),
                             created_at=grec.created)

    def create_group_snapshot(self, request: GroupSnapshotRequest) -> GroupSnapshot:
        name, source_volumes = request.name, request.source_volumes
        local_id = ids.local_id_for_name(name)
        grec = self.store.read_group(local_id)
        if grec is not None:
            return self._group(local_id, grec)
        records = [(v, self._existing_volume(v)) for v in source_volumes]
        members = [f"{local_id}.{i}" for i in range(len(records))]
        for member in members:  # left by an attempt that crashed before the group existed
            self.store.discard(self.store.snapshots, member)
        grec = GroupRecord(name=name, members=members, sources=list(source_volumes))
        self._check_room([(self.store.volumes, v, rec) for v, rec in records])
        scratch = ""
        try:
            with contextlib.ExitStack() as frozen:
                # Every member sees the same instant: all image filesystems are frozen together.
                for volume_id, rec in records:
                    frozen.enter_context(self.attacher.frozen(volume_id, rec))
                for member, (volume_id, _) in zip(members, records, strict=True):
                    self._take_snapshot(member, f"{name}/{volume_id}", volume_id, group=local_id)
            scratch = self.store.scratch(local_id)
            self.store.commit(scratch, self.store.groups, local_id, grec, "create-group-snapshot")
        except BaseException as exc:
            # Members made before the failure would outlive a group that never appeared.
            for member in members:
                self.store.discard(self.store.snapshots, member)
            if isinstance(exc, OSError):
                raise _os_error("could not take the group snapshot", exc) from exc
            raise
        finally:
            if scratch and os.path.lexists(scratch):
                shutil.rmtree(scratch, ignore_errors=True)
        return self._group(local_id, grec)

    def delete_group_snapshot(self, local_id: str, *, secrets: Secrets) -> None:
        grec = self.store.read_group(local_id)
        if grec is None:
            return
        # Members first: a crash part-way leaves the group, and a retry finishes the job.
        for member in grec.members:
            self.store.discard(self.store.snapshots, member)
        self.store.discard(self.store.groups, local_id)

    def get_group_snapshot(self, local_id: str, *, secrets: Secrets
                           ) -> GroupSnapshot | None:
        grec = self.store.read_group(local_id)
        return None if grec is None else self._group(local_id, grec)

    # -- node ----------------------------------------------------------------------------
    def stage(self, request: StageRequest) -> None:
        rec = self.store.read(self.store.volumes, request.local_id)
        if rec is None:
            raise errors.NotFound(
                f"volume {self.name}:{request.local_id} does not exist on this node")
        self.attacher.stage(request.local_id, rec, request.staging_path, request.capability)

    def unstage(self, local_id: str, staging_path: str) -> None:
        self.attacher.unstage(local_id, staging_path)

    def owns_mount(self, local_id: str, path: str | None) -> bool:
        rec = self.store.read(self.store.volumes, local_id)
        return rec is not None and (path is None or self.attacher.owns(local_id, rec, path))

    def node_expand(self, request: NodeExpandRequest) -> int:
        rec = self._existing_volume(request.local_id)
        if rec.layout != DIRECTORY:
            self.attacher.expand(request.local_id, rec, request.volume_path)
        return rec.size

    def node_condition(self, local_id: str, volume_path: str) -> Condition:
        return self.attacher.condition(local_id, self.store.read(self.store.volumes, local_id),
                                       volume_path)


def _os_error(what: str, exc: OSError) -> errors.CsiError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return errors.ResourceExhausted(f"{what}: the filesystem is full")
    return errors.Internal(f"{what}: {exc.strerror}")
