"""CephFS backend: a volume is a subvolume of one group, its size the subvolume's quota;
snapshots are subvolume snapshots, restores and clones the volumes module's asynchronous clones.
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from ... import errors, faults, ids
from ..base import (
    NO_SECRETS,
    AccessMode,
    Backend,
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
from . import records
from .config import CephfsConfig
from .mount import Mounter
from .records import SNAPSHOT, VOLUME, SnapshotRecord, VolumeRecord
from .subvolumes import MgrError, Subvolumes, translate

# ControllerModifyVolume: pin the subvolume to an MDS rank (-1: no pin), as
# `ceph fs subvolume pin ... export RANK` does.
EXPORT_PIN = "exportPin"
# How long CreateVolume waits for a clone before answering ABORTED (the provisioner retries).
CLONE_WAIT = 5.0


class CephfsBackend(Backend[CephfsConfig]):
    type_name = "cephfs"
    Config = CephfsConfig
    features = Features(
        access_modes=frozenset(AccessMode),
        parameters=frozenset({"pool"}),
        mutable_parameters=frozenset({EXPORT_PIN}),
        snapshots=True,
        clones=True,
        expansion=Expansion.ONLINE,
        volume_condition=True,
    )

    def __init__(self, name: str, config: CephfsConfig, node: NodeInfo) -> None:
        super().__init__(name, config, node)
        self.cluster = Cluster(config, namespace=records.namespace(config.subvolumeGroup),
                               commands_in_threads=True)
        self.volumes = Subvolumes(self.cluster, config)
        self.mounter = Mounter(config)
        self._data_pools: list[str] = []
        self._prepared: set[Credentials] = set()
        self._prepare_lock = threading.Lock()

    # -- plumbing ------------------------------------------------------------------------
    def _creds(self, secrets: Secrets) -> Credentials:
        creds = credentials(self.config, secrets)
        if creds not in self._prepared:
            self._prepare(creds)
        return creds

    def _prepare(self, creds: Credentials) -> None:
        """Find the filesystem's pools (records live in its metadata pool) and make sure the
        subvolume group exists: once per credential set, as each may be the only one there is."""
        with self._prepare_lock:
            if creds in self._prepared:
                return
            ret, out = self.cluster.mon_command(creds, {"prefix": "fs ls", "format": "json"},
                                                "listing the filesystems")
            if ret == -errno.EACCES:
                raise errors.PermissionDenied(
                    f"Ceph refused user {creds.user!r} the filesystem list (needs mon 'allow r')")
            if ret != 0:
                raise errors.Unavailable(f"listing the filesystems failed ({ret})")
            found = {f["name"]: f for f in json.loads(out)}
            fs = found.get(self.config.fsName)
            if fs is None:
                raise errors.InvalidArgument(
                    f"filesystem {self.config.fsName!r} does not exist in the Ceph cluster "
                    f"(there: {', '.join(sorted(found)) or 'none'})")
            self.cluster.pool = fs["metadata_pool"]
            self._data_pools = list(fs["data_pools"])
            self.volumes.call(creds, "fs subvolumegroup create",
                              f"creating subvolume group {self.config.subvolumeGroup!r}",
                              group_name=self.config.subvolumeGroup)
            self._prepared.add(creds)

    def _records(self, creds: Credentials, what: str, fn: Any) -> Any:
        return self.cluster.call(creds, what, fn)

    def _sub(self, local_id: str) -> str:
        return self.config.volumeNamePrefix + local_id

    def _snap(self, local_id: str) -> str:
        return self.config.snapshotNamePrefix + local_id

    def _group(self, **extra: Any) -> dict[str, Any]:
        return {"group_name": self.config.subvolumeGroup, **extra}

    def _volume(self, local_id: str, rec: VolumeRecord, condition: Condition | None) -> Volume:
        kind, _, source_id = rec.source.partition(":")
        return Volume(
            local_id=local_id, name=rec.name, size=rec.size, parameters=rec.parameters,
            source=Source(kind, source_id) if kind else None,
            mutable_parameters=rec.mutable, condition=condition,
            context={"fsName": self.config.fsName, "subvolumePath": rec.path})

    @staticmethod
    def _snapshot(local_id: str, rec: SnapshotRecord) -> Snapshot:
        return Snapshot(local_id=local_id, name=rec.name, source_volume=rec.volume,
                        size=rec.size, created_at=rec.created)

    def probe(self) -> None:
        try:
            import rados  # noqa: F401
        except ImportError:
            raise errors.Unavailable(
                "the Ceph Python bindings are missing: install python3-rados") from None
        if self.config.userID and self.config.userKeyFile and self.node.controller:
            self._creds(NO_SECRETS)

    # -- volumes -------------------------------------------------------------------------
    def create_volume(self, request: VolumeRequest) -> Volume:
        local_id = ids.local_id_for_name(request.name)
        creds = self._creds(request.secrets)
        rec = self._records(creds, "reading the volume record",
                            lambda ctx: records.read_volume(ctx, local_id))
        if rec is not None and rec.state == "complete":
            return self._volume(local_id, rec, None)
        wanted = f"{request.source.kind}:{request.source.local_id}" if request.source else ""
        if rec is not None and rec.source != wanted:
            raise errors.AlreadyExists(
                f"volume {request.name!r} is already being made from another source")
        pool = request.parameters.get("pool", self.config.pool)
        self._check_pin(request.mutable_parameters)
        if request.source is not None:
            rec = rec or VolumeRecord(name=request.name, size=request.size,
                                      parameters=dict(request.parameters), state="cloning",
                                      source=wanted)
            return self._clone(creds, local_id, rec, request, pool)
        sub = self._sub(local_id)
        rec = VolumeRecord(name=request.name, size=request.size,
                           parameters=dict(request.parameters), state="creating")
        # First a record saying so: a DeleteVolume after a create that failed half-way (or
        # that the mgr ran late) finds the subvolume as ours.
        self._save(creds, VOLUME, local_id, rec)
        # Idempotent in the module: a retry after a crash finds the subvolume and sets the
        # same quota again.
        args = self._group(sub_name=sub, size=request.size)
        if pool:
            args["pool_layout"] = pool
        self.volumes.call(creds, "fs subvolume create", f"creating subvolume {sub}", **args)
        faults.point("create-volume")
        rec.path, rec.state = self._path(creds, sub), "complete"
        if request.mutable_parameters:
            self._pin(creds, sub, request.mutable_parameters)
            rec.mutable = dict(request.mutable_parameters)
        self._save(creds, VOLUME, local_id, rec)
        return self._volume(local_id, rec, None)

    def _path(self, creds: Credentials, sub: str) -> str:
        return self.volumes.call(creds, "fs subvolume getpath", f"finding subvolume {sub}",
                                 **self._group(sub_name=sub)).decode().strip()

    def _save(self, creds: Credentials, kind: str, local_id: str,
              rec: VolumeRecord | SnapshotRecord) -> None:
        self._records(creds, "writing the record",
                      lambda ctx: records.write(ctx, kind, local_id, rec))

    def _clone(self, creds: Credentials, local_id: str, rec: VolumeRecord,
               request: VolumeRequest, pool: str) -> Volume:
        """Start (or look in on) the clone; the volume once it is complete, else ABORTED."""
        assert request.source is not None
        sub, source = self._sub(local_id), request.source
        temp = f"clone-{local_id}"  # the snapshot a volume is cloned from
        state = self._clone_state(creds, sub)
        if state is None:  # not started yet
            if source.kind == "snapshot":
                snap = self._records(creds, "reading the snapshot record",
                                     lambda ctx: records.read_snapshot(ctx, source.local_id))
                if snap is None or snap.state != "complete":
                    raise errors.NotFound(f"snapshot {self.name}:{source.local_id} does not exist")
                from_sub, from_snap, from_size = self._sub(snap.volume), self._snap(
                    source.local_id), snap.size
            else:
                vol = self._records(creds, "reading the source record",
                                    lambda ctx: records.read_volume(ctx, source.local_id))
                if vol is None or vol.state != "complete":
                    raise errors.NotFound(f"volume {self.name}:{source.local_id} does not exist")
                from_sub, from_snap, from_size = self._sub(source.local_id), temp, vol.size
            rec.size = max(rec.size, from_size)
            if request.limit and rec.size > request.limit:
                raise errors.OutOfRange(
                    f"the source holds {from_size} bytes, more than limit_bytes {request.limit}")
            self._save(creds, VOLUME, local_id, rec)  # state "cloning": DeleteVolume cancels
            args = self._group(sub_name=from_sub, snap_name=from_snap, target_sub_name=sub,
                               target_group_name=self.config.subvolumeGroup)
            if pool:
                args["pool_layout"] = pool
            try:
                if source.kind == "volume":
                    self.volumes.call(creds, "fs subvolume snapshot create",
                                      f"snapshotting subvolume {from_sub} for a clone",
                                      **self._group(sub_name=from_sub, snap_name=temp))
                self.volumes.call(creds, "fs subvolume snapshot clone",
                                  f"cloning {from_sub}@{from_snap} to {sub}", **args)
            except errors.CsiError:
                with contextlib.suppress(errors.CsiError):
                    if self._clone_state(creds, sub) is None:  # never started: nothing kept
                        self._drop_temp(creds, source, temp)
                raise
            faults.point("clone-started")
        state = self._wait_clone(creds, sub, state or "pending")
        if state in ("failed", "canceled"):
            reason = self._clone_failure(creds, sub)
            self._remove_subvolume(creds, sub, force=True)
            self._drop_temp(creds, source, temp)
            self._records(creds, "removing the record",
                          lambda ctx: records.remove(ctx, VOLUME, local_id))
            raise errors.Aborted(
                f"the clone into subvolume {sub} {state}: {reason}; it was removed, retry")
        if state != "complete":
            raise errors.Aborted(f"volume {request.name!r} is a clone still being copied "
                                 f"({state}); retry")
        self._drop_temp(creds, source, temp)
        if rec.size:
            self.volumes.call(creds, "fs subvolume resize", f"sizing subvolume {sub}",
                              **self._group(sub_name=sub, new_size=str(rec.size),
                                            no_shrink=True))
        if request.mutable_parameters:
            self._pin(creds, sub, request.mutable_parameters)
            rec.mutable = dict(request.mutable_parameters)
        rec.path, rec.state = self._path(creds, sub), "complete"
        self._save(creds, VOLUME, local_id, rec)
        return self._volume(local_id, rec, None)

    def _clone_state(self, creds: Credentials, sub: str) -> str | None:
        try:
            status = self.volumes.json(creds, "fs clone status", f"clone status of {sub}",
                                       **self._group(clone_name=sub))
        except MgrError as exc:
            if exc.code == errno.ENOENT:
                return None
            if exc.code in (errno.EINVAL, errno.EOPNOTSUPP):  # a subvolume that is no clone
                raise errors.AlreadyExists(
                    f"subvolume {sub} exists and is not a clone of the requested source"
                ) from None
            raise translate(exc, creds.user, f"clone status of {sub}", self.config) from None
        return str(status["status"]["state"])

    def _clone_failure(self, creds: Credentials, sub: str) -> str:
        try:
            status = self.volumes.json(creds, "fs clone status", f"clone status of {sub}",
                                       **self._group(clone_name=sub))
            failure = status["status"].get("failure", {})
            return str(failure.get("errstr") or failure.get("errno") or "no reason given")
        except (MgrError, KeyError, TypeError):
            return "no reason given"

    def _wait_clone(self, creds: Credentials, sub: str, state: str) -> str:
        # Each status call queues in the mgr behind every other command.
        # Every 50 ms for the first second (most clones of a small volume are done by then),
        # then backing off.
        start = time.monotonic()
        pause = 0.05
        while state in ("pending", "in-progress") and time.monotonic() < start + CLONE_WAIT:
            time.sleep(pause)
            if time.monotonic() > start + 1.0:
                pause = min(pause * 1.5, 1.0)
            state = self._clone_state(creds, sub) or "canceled"
        return state

    def _drop_temp(self, creds: Credentials, source: Source, temp: str) -> None:
        if source.kind != "volume":
            return
        try:
            self.volumes.run(creds, "fs subvolume snapshot rm", "dropping the clone snapshot",
                             **self._group(sub_name=self._sub(source.local_id), snap_name=temp,
                                           force=True))
        except MgrError as exc:
            if exc.code != errno.ENOENT:
                raise translate(exc, creds.user, "dropping the clone snapshot",
                                self.config) from None

    def _remove_subvolume(self, creds: Credentials, sub: str, force: bool = False) -> None:
        try:
            # Snapshots outlive their volume (CSI snapshots are independent of it): the module
            # keeps them, and the subvolume's last trace goes with the last of them.
            self.volumes.run(creds, "fs subvolume rm", f"removing subvolume {sub}",
                             **self._group(sub_name=sub, retain_snapshots=not force,
                                           force=force))
        except MgrError as exc:
            if exc.code == errno.ENOENT:
                return
            if exc.code == errno.EAGAIN and "pending clones" in exc.message.lower():
                raise errors.Aborted(
                    f"subvolume {sub} is the source of a clone still being copied; retry once "
                    "it completes") from None
            if exc.code == errno.EAGAIN and not force:  # an unfinished clone: stop it first
                try:
                    self.volumes.run(creds, "fs clone cancel", f"cancelling clone {sub}",
                                     **self._group(clone_name=sub))
                except MgrError as cancel:
                    if cancel.code not in (errno.EINVAL, errno.ENOENT):
                        raise translate(cancel, creds.user, f"cancelling clone {sub}",
                                        self.config) from None
                self._remove_subvolume(creds, sub, force=True)
                return
            raise translate(exc, creds.user, f"removing subvolume {sub}", self.config) from None

    def delete_volume(self, local_id: str, *, secrets: Secrets) -> None:
        creds = self._creds(secrets)
        rec = self._records(creds, "reading the volume record",
                            lambda ctx: records.read_volume(ctx, local_id))
        if rec is None:
            return  # never made, or deleted: a subvolume without a record is not ours to drop
        self._remove_subvolume(creds, self._sub(local_id))
        faults.point("delete-volume")
        if rec.source.startswith("volume:") and rec.state != "complete":
            self._drop_temp(creds, Source("volume", rec.source[len("volume:"):]),
                            f"clone-{local_id}")
        self._records(creds, "removing the record",
                      lambda ctx: records.remove(ctx, VOLUME, local_id))

    def list_volumes(self, query: Query) -> Iterator[Volume]:
        creds = self._creds(query.secrets)

        def scan(ctx: Any) -> list[tuple[str, VolumeRecord]]:
            found = ([query.local_id] if query.local_id
                     else list(records.local_ids(ctx, VOLUME)))
            out = []
            for local_id in found:
                rec = records.read_volume(ctx, local_id)
                if rec is not None and rec.state == "complete" and query.wants(local_id):
                    out.append((local_id, rec))
            return out

        found = self._records(creds, "listing the volume records", scan)
        if not found:
            return iter(())
        if not query.condition:
            conditions: dict[str, Condition | None] = {i: None for i, _ in found}
        elif query.local_id:
            conditions = {query.local_id: self._condition(creds, self._sub(query.local_id))}
        else:
            listed = {s["name"] for s in self.volumes.json(
                creds, "fs subvolume ls", "listing subvolumes", **self._group())}
            conditions = {i: Condition(False, "") if self._sub(i) in listed else Condition(
                True, f"subvolume {self._sub(i)} is gone from group "
                      f"{self.config.subvolumeGroup!r}") for i, _ in found}
        return (self._volume(i, r, conditions[i]) for i, r in found)

    def _condition(self, creds: Credentials, sub: str) -> Condition:
        try:
            info = self.volumes.json(creds, "fs subvolume info", f"inspecting {sub}",
                                     **self._group(sub_name=sub))
        except MgrError as exc:
            if exc.code == errno.ENOENT:
                return Condition(True, f"subvolume {sub} is gone: {exc.message}")
            return Condition(True, f"subvolume {sub}: {exc.message}")
        state = info.get("state", "complete")
        if state != "complete":
            return Condition(True, f"subvolume {sub} is {state}")
        return Condition(False, "")

    def capacity(self, parameters: Mapping[str, str]) -> Capacity:
        creds = self._creds(NO_SECRETS)
        pool = parameters.get("pool") or self.config.pool or self._data_pools[0]
        if pool not in self._data_pools:
            raise errors.InvalidArgument(
                f"pool {pool!r} is not a data pool of filesystem {self.config.fsName!r} "
                f"({', '.join(self._data_pools)})")
        ret, out = self.cluster.mon_command(creds, {"prefix": "df", "format": "json"},
                                            "reading the pool's free space")
        if ret != 0:
            raise errors.Unavailable(f"ceph df failed ({ret}); does {creds.user} have mon 'r'?")
        pools = {p["name"]: p["stats"] for p in json.loads(out)["pools"]}
        if pool not in pools:
            raise errors.Unavailable(f"ceph df shows no pool {pool!r} to user {creds.user!r}")
        # A quota reserves nothing (volumes are thin): no maximum volume size.
        return Capacity(available=int(pools[pool]["max_avail"]))

    def update_volume(self, update: VolumeUpdate) -> tuple[int, bool]:
        creds = self._creds(update.secrets)
        local_id, sub = update.local_id, self._sub(update.local_id)
        rec = self._records(creds, "reading the volume record",
                            lambda ctx: records.read_volume(ctx, local_id))
        if rec is None or rec.state != "complete":
            raise errors.NotFound(f"volume {self.name}:{local_id} does not exist")
        if update.mutable_parameters:
            self._pin(creds, sub, update.mutable_parameters)
            rec.mutable = {**rec.mutable, **update.mutable_parameters}
        if update.size > rec.size:
            # The quota is the size: it grows online, with nothing for the node to do.
            self.volumes.call(creds, "fs subvolume resize", f"resizing subvolume {sub}",
                              **self._group(sub_name=sub, new_size=str(update.size),
                                            no_shrink=True))
            rec.size = update.size
        self._save(creds, VOLUME, local_id, rec)
        return rec.size, False

    @staticmethod
    def _check_pin(mutable: Mapping[str, str]) -> None:
        for key, value in mutable.items():
            if key != EXPORT_PIN or not re.fullmatch(r"-1|0|[1-9][0-9]{0,3}", value):
                raise errors.InvalidArgument(
                    f"{key}={value!r}: the mutable parameter is {EXPORT_PIN}, an MDS rank "
                    "(0, 1, ...) or -1 for none")

    def _pin(self, creds: Credentials, sub: str, mutable: Mapping[str, str]) -> None:
        self._check_pin(mutable)
        for value in mutable.values():
            self.volumes.call(creds, "fs subvolume pin", f"pinning subvolume {sub}",
                              **self._group(sub_name=sub, pin_type="export",
                                            pin_setting=value))

    # -- snapshots -----------------------------------------------------------------------
    def create_snapshot(self, request: SnapshotRequest) -> Snapshot:
        local_id = ids.local_id_for_name(request.name)
        creds = self._creds(request.secrets)

        def look(ctx: Any) -> tuple[SnapshotRecord | None, VolumeRecord | None]:
            return (records.read_snapshot(ctx, local_id),
                    records.read_volume(ctx, request.source_volume))

        snap, vol = self._records(creds, "reading the records", look)
        if snap is not None and (snap.state == "complete"
                                 or snap.volume != request.source_volume):
            return self._snapshot(local_id, snap)  # the service refuses another volume's
        if vol is None or vol.state != "complete":
            raise errors.NotFound(f"volume {self.name}:{request.source_volume} does not exist")
        sub = self._sub(request.source_volume)
        snap = SnapshotRecord(name=request.name, volume=request.source_volume, size=vol.size,
                              created=time.time(), state="creating")
        # First the record: a snapshot whose create failed half-way (or ran late in the mgr)
        # is still found, and deleted, by DeleteSnapshot.
        self._save(creds, SNAPSHOT, local_id, snap)
        self.volumes.call(creds, "fs subvolume snapshot create", f"snapshotting {sub}",
                          **self._group(sub_name=sub, snap_name=self._snap(local_id)))
        faults.point("create-snapshot")
        snap.state = "complete"
        self._save(creds, SNAPSHOT, local_id, snap)
        return self._snapshot(local_id, snap)

    def delete_snapshot(self, local_id: str, *, secrets: Secrets) -> None:
        creds = self._creds(secrets)
        snap = self._records(creds, "reading the snapshot record",
                             lambda ctx: records.read_snapshot(ctx, local_id))
        if snap is None:
            return
        sub = self._sub(snap.volume)
        try:
            self.volumes.run(creds, "fs subvolume snapshot rm", f"removing a snapshot of {sub}",
                             **self._group(sub_name=sub, snap_name=self._snap(local_id)))
        except MgrError as exc:
            if exc.code == errno.EAGAIN:
                raise errors.Aborted(f"snapshot {self.name}:{local_id} is the source of a "
                                     "restore still being copied; retry once it completes"
                                     ) from None
            if exc.code != errno.ENOENT:
                raise translate(exc, creds.user, f"removing a snapshot of {sub}",
                                self.config) from None
        self._records(creds, "removing the record",
                      lambda ctx: records.remove(ctx, SNAPSHOT, local_id))

    def list_snapshots(self, query: Query) -> Iterator[Snapshot]:
        creds = self._creds(query.secrets)

        def scan(ctx: Any) -> list[Snapshot]:
            found = ([query.local_id] if query.local_id
                     else list(records.local_ids(ctx, SNAPSHOT)))
            out = []
            for local_id in found:
                rec = records.read_snapshot(ctx, local_id)
                if (rec is not None and rec.state == "complete"
                        and query.wants(local_id, rec.volume)):
                    out.append(self._snapshot(local_id, rec))
            return out

        return iter(self._records(creds, "listing the snapshot records", scan))

    # -- node ----------------------------------------------------------------------------
    def stage(self, request: StageRequest) -> None:
        self.mounter.stage(request, self._sub(request.local_id),
                           credentials(self.config, request.secrets))

    def unstage(self, local_id: str, staging_path: str) -> None:
        self.mounter.unstage(staging_path)

    def restage_problem(self, secrets: Secrets) -> str | None:
        try:
            credentials(self.config, secrets)
        except errors.CsiError as exc:
            return (f"{exc.message} (NodePublish carries no node-stage secret: give the "
                    "nodes userID/userKeyFile to remount by themselves)")
        return None

    def owns_mount(self, local_id: str, path: str | None) -> bool:
        return path is None or self.mounter.owns(self._sub(local_id), path)

    def node_expand(self, request: NodeExpandRequest) -> int:
        return request.required  # the quota is the size: nothing to grow on the node

    def node_condition(self, local_id: str, volume_path: str) -> Condition:
        return self.mounter.condition(volume_path)

    def node_usage(self, local_id: str, volume_path: str) -> tuple[int, int] | None:
        return self.mounter.usage(volume_path)
