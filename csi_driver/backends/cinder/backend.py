"""OpenStack Cinder backend: volumes and snapshots in Cinder, placed in availability zones,
attached through Nova (OpenStack instances) or Cinder attachments (any other node)."""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any

from ... import errors, faults
from ..base import (
    AccessMode,
    Attachment,
    Backend,
    Capability,
    Capacity,
    Condition,
    Expansion,
    Features,
    NodeExpandRequest,
    NodeInfo,
    Query,
    Secrets,
    Segments,
    Snapshot,
    SnapshotRequest,
    StageRequest,
    Volume,
    VolumeRequest,
    VolumeUpdate,
)
from . import records
from .attach import Attacher
from .cloud import Api, Backoff, Cloud
from .config import CinderConfig
from .node import NodeSide
from .records import GiB
from .watch import Watch

_MULTI_NODE = frozenset({AccessMode.MULTI_NODE_READER_ONLY, AccessMode.MULTI_NODE_SINGLE_WRITER,
                         AccessMode.MULTI_NODE_MULTI_WRITER})
# What Cinder's scheduler says when no backend of the type (in the zone) can take the volume.
_NO_ROOM = ("weighted backend", "No valid backend", "Insufficient free space", "No valid host")


_RECENT_S = 1.0


class CinderBackend(Backend[CinderConfig]):
    type_name = "cinder"
    Config = CinderConfig
    features = Features(
        access_modes=frozenset(AccessMode),
        block=True,
        parameters=frozenset({"type", "availability"}),
        mutable_parameters=frozenset({"type"}),
        snapshots=True,
        clones=True,
        expansion=Expansion.ONLINE,
        volume_condition=True,
        attach=True,
    )

    def __init__(self, name: str, config: CinderConfig, node: NodeInfo) -> None:
        super().__init__(name, config, node)
        self.cloud = Cloud(config, name)
        self.backoff = Backoff()
        self.watch = Watch({"metadata": repr({records.BACKEND: name})},
                           lambda: self.backoff.typical("create"),
                           lambda took: self.backoff.learn("create", took))
        self.attacher = Attacher(self)
        self.node_side = NodeSide(config)
        self._recent: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._recent_lock = threading.Lock()

    # -- plumbing ------------------------------------------------------------------------
    def api(self, secrets: Secrets) -> Api:
        return self.cloud.api(secrets)

    def deadline(self) -> float:
        return time.monotonic() + self.config.waitSeconds

    @property
    def topology_keys(self) -> frozenset[str]:
        zoned = {self.config.zoneKey} if self.config.availabilityZones else set()
        return frozenset({*self.segments, *zoned})

    def node_segments(self) -> Segments:
        if not self.config.availabilityZones:
            return {}
        zone = self.node_side.zone()
        return {self.config.zoneKey: zone} if zone else {}

    def _volume(self, data: Mapping[str, Any]) -> Volume:
        return records.volume(data, self.config.zoneKey, bool(self.config.availabilityZones))

    def get(self, api: Api, local_id: str) -> dict[str, Any] | None:
        """The volume's JSON, or None when Cinder has no such volume."""
        if not records.is_uuid(local_id):  # else /volumes/detail would be a listing
            return None
        found = api.volume("GET", f"/volumes/{_quote(local_id)}", f"reading volume {local_id}",
                           missing_ok=True)
        return None if found is None else dict(found["volume"])

    def recent(self, api: Api, local_id: str) -> dict[str, Any] | None:
        """The volume's JSON as read a moment ago in this same RPC (ControllerPublish's lookup
        of the volume, under the service's lock), else read now: one request less per publish."""
        with self._recent_lock:
            at, data = self._recent.pop(local_id, (0.0, None))
        if data is not None and time.monotonic() - at < _RECENT_S:
            return data
        return self.get(api, local_id)

    def probe(self) -> None:
        try:
            import openstack  # noqa: F401
        except ImportError:
            raise errors.Unavailable("openstacksdk is missing: pip install openstacksdk") from None
        if self.config.cloudsFile and self.node.controller:
            self.api({}).volume("GET", "/limits", "checking Cinder")

    # -- volumes -------------------------------------------------------------------------
    def capability_problem(self, capability: Capability, parameters: Mapping[str, str]
                           ) -> str | None:
        mode = capability.access_mode
        if (mode in _MULTI_NODE and mode != AccessMode.MULTI_NODE_READER_ONLY
                and not capability.block):
            return ("a filesystem on a Cinder volume may be written from one node only: "
                    f"{mode.name} needs raw block access (and a multi-attach volume type)")
        return None

    def _zone(self, request: VolumeRequest) -> str:
        pinned = request.parameters.get("availability", "")
        zones, key = self.config.availabilityZones, self.config.zoneKey
        if not zones:
            return pinned
        # A requisite segment without the zone key allows every zone.
        allowed = [z for z in zones
                   if not request.requisite or any(s.get(key, z) == z for s in request.requisite)]
        if pinned:
            if pinned not in zones:
                raise errors.InvalidArgument(
                    f"availability={pinned!r} is not one of this backend's zones "
                    f"({', '.join(zones)})")
            if pinned not in allowed:
                raise errors.ResourceExhausted(
                    f"availability zone {pinned} is not in the requisite topology")
            return pinned
        if not allowed:
            raise errors.ResourceExhausted(
                f"none of this backend's availability zones ({', '.join(zones)}) is in the "
                "requisite topology")
        preferred = [s[key] for s in request.preferred if s.get(key) in allowed]
        return preferred[0] if preferred else allowed[0]

    def _by_name(self, api: Api, name: str) -> dict[str, Any] | None:
        query = urllib.parse.urlencode({"name": name})
        found = [v for v in api.volume("GET", f"/volumes/detail?{query}",
                                       f"looking up volume {name}")["volumes"]
                 if records.ours(v, self.name) and v["metadata"][records.NAME] == name]
        return min(found, key=lambda v: str(v.get("created_at"))) if found else None

    def _multiattach_type(self, api: Api, wanted: str) -> bool:
        for t in api.volume("GET", "/types", "reading volume types")["volume_types"]:
            if wanted in (t.get("name"), t.get("id")) or (not wanted and t.get("is_default")):
                spec = str((t.get("extra_specs") or {}).get("multiattach", "")).lower()
                return spec in ("<is> true", "true")
        return False

    def create_volume(self, request: VolumeRequest) -> Volume:
        api = self.api(request.secrets)
        deadline = self.deadline()
        vtype = (request.mutable_parameters.get("type") or request.parameters.get("type")
                 or self.config.volumeType)
        zone = self._zone(request)
        size = records.gib(request.size)
        if request.limit and size * GiB > request.limit:
            raise errors.OutOfRange(
                f"Cinder volumes come in whole GiB: {size} GiB exceeds limit {request.limit}")
        found = self._by_name(api, request.name)
        if found is not None and found["status"] == "error":
            self._discard(api, found, deadline)  # a failed attempt: start again
            found = None
        if found is None:
            source = self._source(api, request)
            size = max(size, source[1])
            if request.limit and size * GiB > request.limit:
                raise errors.OutOfRange(
                    f"the source holds {source[1]} GiB, more than limit {request.limit}")
            if any(c.access_mode in _MULTI_NODE for c in request.capabilities
                   ) and not self._multiattach_type(api, vtype):
                raise errors.InvalidArgument(
                    f"volume type {vtype or '(default)'!r} is not multi-attach; multi-node "
                    "writers need a type with multiattach='<is> True'")
            md = {records.NAME: request.name, records.BACKEND: self.name,
                  records.BLOCK: "1" if request.block else "0",
                  records.PARAMS: records.value(dict(request.parameters))}
            if request.mutable_parameters:
                md[records.MUTABLE] = records.value(dict(request.mutable_parameters))
            p = request.provisioner
            md.update({k: v for k, v in (("berth.pvc", f"{p.pvc_namespace}/{p.pvc_name}"
                                          if p.pvc_name else ""), ("berth.pv", p.pv_name)) if v})
            body: dict[str, Any] = {"name": request.name, "size": size, "metadata": md}
            if vtype:
                body["volume_type"] = vtype
            if zone:
                body["availability_zone"] = zone
            if source[0]:
                body[source[0]] = request.source.local_id if request.source else ""
            try:
                found = api.volume("POST", "/volumes", f"creating volume {request.name}",
                                   body={"volume": body})["volume"]
            except errors.NotFound as exc:  # a volume type (or zone) the cloud does not have
                raise errors.InvalidArgument(exc.message) from None
            faults.point("create-volume")
        assert found is not None
        what = f"creating volume {request.name}"
        made = (self.watch.until_created(api, str(found["id"]), deadline, what)
                if found["status"] == "creating" else dict(found))
        if made is None:
            raise errors.Unavailable(f"{what}: the volume disappeared while Cinder made it")
        done = self._settle(api, made, ("downloading",), deadline, "create", what)
        if done["status"] == "error":  # any other state is a made volume (in use, say)
            message = self._fault(api, done)
            self._discard(api, done, self.deadline())
            text = f"Cinder could not create volume {request.name}: {message}"
            if any(words in message for words in _NO_ROOM):
                raise errors.ResourceExhausted(text)
            raise errors.Unavailable(text)
        return self._volume(done)

    def _source(self, api: Api, request: VolumeRequest) -> tuple[str, int]:
        """(the create body's key for the source, its size in GiB); ("", 0) without one."""
        if request.source is None:
            return "", 0
        kind, local_id = request.source.kind, request.source.local_id
        if not records.is_uuid(local_id):
            raise errors.NotFound(f"source {kind} {self.name}:{local_id} does not exist")
        path = f"/{'snapshots' if kind == 'snapshot' else 'volumes'}/{_quote(local_id)}"
        found = api.volume("GET", path, f"reading source {kind} {local_id}", missing_ok=True)
        data = found and found[kind]
        if not data or not records.ours(data, self.name):
            raise errors.NotFound(f"source {kind} {self.name}:{local_id} does not exist")
        if data["status"] not in ("available", "in-use"):
            raise errors.Unavailable(f"source {kind} {local_id} is {data['status']}; retry")
        return ("snapshot_id" if kind == "snapshot" else "source_volid"), int(data["size"])

    def _settle(self, api: Api, data: Mapping[str, Any], busy: tuple[str, ...], deadline: float,
                kind: str, what: str) -> dict[str, Any]:
        """The volume once its status has left `busy` (DEADLINE_EXCEEDED past the deadline)."""
        if data["status"] not in busy:
            return dict(data)
        local_id = str(data["id"])

        def look() -> dict[str, Any] | None:
            return self.get(api, local_id)

        found = self.backoff.wait(kind, deadline, look,
                                  lambda v: v is None or v["status"] not in busy, what)
        if found is None:
            raise errors.Unavailable(f"{what}: the volume disappeared while Cinder worked on it")
        return dict(found)

    def _fault(self, api: Api, data: Mapping[str, Any]) -> str:
        """Cinder's user message for the volume (its fault as the user may see it)."""
        query = urllib.parse.urlencode({"resource_uuid": data["id"], "sort": "created_at:desc"})
        try:
            found = api.volume("GET", f"/messages?{query}", "reading Cinder's messages",
                               microversion="3.3")["messages"]
        except errors.CsiError:
            found = []
        return str(found[0]["user_message"]) if found else f"status {data['status']}"

    def _discard(self, api: Api, data: Mapping[str, Any], deadline: float) -> None:
        """Delete a volume and wait until it is gone."""
        local_id = str(data["id"])
        if data["status"] != "deleting":
            try:
                api.volume("DELETE", f"/volumes/{_quote(local_id)}",
                           f"deleting volume {local_id}", missing_ok=True)
            except errors.InvalidArgument as exc:  # the volume is as it is: not the caller's
                raise errors.FailedPrecondition(exc.message) from None
        faults.point("delete-volume")
        gone = self.backoff.wait("delete", deadline, lambda: self.get(api, local_id),
                                 lambda v: v is None or v["status"] == "error_deleting",
                                 f"deleting volume {local_id}")
        if gone is not None:
            raise errors.Unavailable(f"Cinder could not delete volume {local_id}: "
                                     f"{self._fault(api, gone)}")

    def delete_volume(self, local_id: str, *, secrets: Secrets) -> None:
        api = self.api(secrets)
        data = self.get(api, local_id)
        if data is None:
            return
        if not records.ours(data, self.name):
            raise errors.FailedPrecondition(
                f"Cinder volume {local_id} was not made by backend {self.name!r}; Berth deletes "
                "only its own volumes")
        held = sorted(records.attachments(data["metadata"]))
        if held or data["status"] in ("in-use", "attaching", "reserved", "detaching"):
            raise errors.FailedPrecondition(
                f"volume {local_id} is attached{' to node ' + repr(held[0]) if held else ''} "
                f"({data['status']}); unpublish it first")
        if data["status"] == "error_deleting":
            raise errors.FailedPrecondition(
                f"Cinder failed to delete volume {local_id} before (error_deleting): an "
                "OpenStack admin must reset its state (openstack volume set --state error)")
        if data["status"] not in ("available", "error", "error_restoring", "error_extending",
                                  "error_managing", "deleting"):
            raise errors.Aborted(f"volume {local_id} is {data['status']}; retry when Cinder is "
                                 "done with it")
        self._discard(api, data, self.deadline())

    def list_volumes(self, query: Query) -> Iterator[Volume]:
        api = self.api(query.secrets)
        if query.local_id:
            data = self.get(api, query.local_id)
            with self._recent_lock:
                if len(self._recent) > 256:  # lookups no publish followed
                    self._recent.clear()
                self._recent[query.local_id] = (time.monotonic(), data)
            if data is not None and records.ours(data, self.name):
                yield self._volume(data)
            return
        for data in self._pages(api, "volumes", {}):
            yield self._volume(data)

    def _pages(self, api: Api, kind: str, filters: Mapping[str, str]) -> Iterator[dict[str, Any]]:
        """Every one of our volumes or snapshots, a page at a time (Cinder's markers)."""
        marker = ""
        while True:
            params = {**filters, "limit": "1000", "sort": "created_at:asc,id:asc",
                      "metadata": repr({records.BACKEND: self.name})}
            if marker:
                params["marker"] = marker
            rows = api.volume("GET", f"/{kind}/detail?{urllib.parse.urlencode(params)}",
                              f"listing {kind}")[kind]
            yield from (r for r in rows if records.ours(r, self.name))
            if len(rows) < 1000:
                return
            marker = rows[-1]["id"]

    def capacity(self, parameters: Mapping[str, str]) -> Capacity:
        api = self.api({})
        limits = api.volume("GET", "/limits", "reading the project's limits")["limits"]["absolute"]
        most = int(limits.get("maxTotalVolumeGigabytes", -1))
        if most < 0:
            raise errors.FailedPrecondition(
                "the project's gigabytes quota is unlimited and Cinder tells a project nothing "
                "else about free space; turn off storage capacity tracking for this driver")
        left = max(0, most - int(limits.get("totalGigabytesUsed", 0))) * GiB
        return Capacity(available=left, maximum_volume_size=left)

    def update_volume(self, update: VolumeUpdate) -> tuple[int, bool]:
        api = self.api(update.secrets)
        data = self.get(api, update.local_id)
        if data is None or not records.ours(data, self.name):
            raise errors.NotFound(f"volume {self.name}:{update.local_id} does not exist")
        if update.mutable_parameters:
            data = self._retype(api, data, update.mutable_parameters)
        size = int(data["size"])
        if not update.size or records.gib(update.size) <= size:
            return size * GiB, False
        wanted = records.gib(update.size)
        in_use = data["status"] == "in-use"
        if in_use and api.max_microversion() < (3, 42):
            raise errors.FailedPrecondition(
                "this Cinder extends attached volumes only from API microversion 3.42; detach the "
                "volume (delete the pod) and expand again")
        api.volume("POST", f"/volumes/{_quote(update.local_id)}/action",
                   f"extending volume {update.local_id}", body={"os-extend": {"new_size": wanted}},
                   microversion="3.42" if in_use else None)
        done = self._settle(api, {"id": update.local_id, "status": "extending"}, ("extending",),
                            self.deadline(), "extend", f"extending volume {update.local_id}")
        if int(done["size"]) < wanted:
            raise errors.Unavailable(f"Cinder did not extend volume {update.local_id} "
                                     f"({done['status']}): {self._fault(api, done)}")
        return int(done["size"]) * GiB, True

    def _retype(self, api: Api, data: dict[str, Any], mutable: Mapping[str, str]
                ) -> dict[str, Any]:
        unknown = set(mutable) - {"type"}
        if unknown or not mutable.get("type"):
            raise errors.InvalidArgument("the one mutable parameter is type (a volume type)")
        wanted, local_id = mutable["type"], str(data["id"])
        if data.get("volume_type") != wanted:
            api.volume("POST", f"/volumes/{_quote(local_id)}/action",
                       f"retyping volume {local_id}",
                       body={"os-retype": {"new_type": wanted, "migration_policy": "on-demand"}})
            data = self._settle(api, {"id": local_id, "status": "retyping"}, ("retyping",),
                                self.deadline(), "retype", f"retyping volume {local_id}")
            if data.get("volume_type") != wanted:
                # Cinder answers 202 and leaves the volume as it was when no backend of the new
                # type can take it (another zone, say): only the type afterwards tells.
                raise errors.FailedPrecondition(
                    f"Cinder did not retype volume {local_id} to {wanted!r} (it is still "
                    f"{data.get('volume_type')!r}): {self._fault(api, data)}")
        api.volume("POST", f"/volumes/{_quote(local_id)}/metadata", "recording the type",
                   body={"metadata": {records.MUTABLE: records.value(dict(mutable))}})
        data.setdefault("metadata", {})[records.MUTABLE] = records.value(dict(mutable))
        return data

    # -- snapshots -----------------------------------------------------------------------
    def _snapshot_get(self, api: Api, local_id: str) -> dict[str, Any] | None:
        if not records.is_uuid(local_id):
            return None
        found = api.volume("GET", f"/snapshots/{_quote(local_id)}",
                           f"reading snapshot {local_id}", missing_ok=True)
        return None if found is None else dict(found["snapshot"])

    def create_snapshot(self, request: SnapshotRequest) -> Snapshot:
        api = self.api(request.secrets)
        deadline = self.deadline()
        query = urllib.parse.urlencode({"name": request.name})
        found = [s for s in api.volume("GET", f"/snapshots/detail?{query}",
                                       f"looking up snapshot {request.name}")["snapshots"]
                 if records.ours(s, self.name)]
        snap = found[0] if found else None
        if snap is not None and snap["volume_id"] != request.source_volume:
            raise errors.AlreadyExists(
                f"snapshot {request.name} exists already, of volume {snap['volume_id']}")
        if snap is not None and snap["status"] == "error":
            self._snapshot_discard(api, str(snap["id"]), deadline)
            snap = None
        if snap is None:
            source = self.get(api, request.source_volume)
            if source is None or not records.ours(source, self.name):
                raise errors.NotFound(f"volume {self.name}:{request.source_volume} does not exist")
            md = {records.NAME: request.name, records.BACKEND: self.name}
            snap = api.volume("POST", "/snapshots", f"snapshotting volume {request.source_volume}",
                              body={"snapshot": {"volume_id": request.source_volume,
                                                 "name": request.name, "force": True,
                                                 "metadata": md}})["snapshot"]
            faults.point("create-snapshot")
        assert snap is not None
        snap_id = str(snap["id"])
        if snap["status"] == "creating":
            snap = self.backoff.wait(
                "snapshot", deadline, lambda: self._snapshot_get(api, snap_id),
                lambda s: s is None or s["status"] != "creating",
                f"snapshotting volume {request.source_volume}")
        if snap is None or snap["status"] != "available":
            status = snap["status"] if snap else "gone"
            if snap is not None:
                self._snapshot_discard(api, snap_id, self.deadline())
            raise errors.Unavailable(f"Cinder could not snapshot volume {request.source_volume} "
                                     f"({status})")
        return records.snapshot(snap)

    def _snapshot_discard(self, api: Api, local_id: str, deadline: float) -> None:
        try:
            api.volume("DELETE", f"/snapshots/{_quote(local_id)}", f"deleting snapshot {local_id}",
                       missing_ok=True)
        except errors.InvalidArgument as exc:
            raise errors.FailedPrecondition(exc.message) from None
        left = self.backoff.wait("delete-snapshot", deadline,
                                 lambda: self._snapshot_get(api, local_id),
                                 lambda s: s is None
                                 or s["status"] in ("available", "error_deleting"),
                                 f"deleting snapshot {local_id}")
        if left is not None:
            # Cinder puts a snapshot it could not delete back to available (the RBD driver when
            # volumes made from it still depend on it).
            raise errors.FailedPrecondition(
                f"Cinder did not delete snapshot {local_id} ({left['status']}): volumes "
                "restored from it may still depend on it; delete them first")

    def delete_snapshot(self, local_id: str, *, secrets: Secrets) -> None:
        api = self.api(secrets)
        snap = self._snapshot_get(api, local_id)
        if snap is None:
            return
        if not records.ours(snap, self.name):
            raise errors.FailedPrecondition(
                f"Cinder snapshot {local_id} was not made by backend {self.name!r}")
        self._snapshot_discard(api, local_id, self.deadline())

    def list_snapshots(self, query: Query) -> Iterator[Snapshot]:
        api = self.api(query.secrets)
        if query.group:
            return
        if query.local_id:
            snap = self._snapshot_get(api, query.local_id)
            if snap is not None and records.ours(snap, self.name) and query.wants(
                    snap["id"], snap["volume_id"]):
                yield records.snapshot(snap)
            return
        filters = {"volume_id": query.source_volume} if query.source_volume else {}
        for snap in self._pages(api, "snapshots", filters):
            yield records.snapshot(snap)

    # -- attach --------------------------------------------------------------------------
    def attach(self, local_id: str, attachment: Attachment, *, secrets: Secrets
               ) -> Mapping[str, str]:
        return self.attacher.attach(self.api(secrets), local_id, attachment)

    def detach(self, local_id: str, node_id: str, *, secrets: Secrets) -> None:
        self.attacher.detach(self.api(secrets), local_id, node_id)

    def node_known(self, node_id: str, *, secrets: Secrets) -> bool:
        return self.attacher.node_known(self.api(secrets), node_id)

    # -- node ----------------------------------------------------------------------------
    def stage(self, request: StageRequest) -> None:
        self.node_side.stage(request)

    def unstage(self, local_id: str, staging_path: str) -> None:
        self.node_side.unstage(local_id, staging_path)

    def owns_mount(self, local_id: str, path: str | None) -> bool:
        return path is None or self.node_side.owns(local_id, path)

    def node_expand(self, request: NodeExpandRequest) -> int:
        return self.node_side.expand(request)

    def node_condition(self, local_id: str, volume_path: str) -> Condition:
        return self.node_side.condition(local_id, volume_path)


def _quote(local_id: str) -> str:
    return urllib.parse.quote(local_id, safe="")
