"""What the NFS backend keeps on the share, and how a volume's directory is named.

  <subDir>/                   a volume's files, where the subDir template puts them
  .berth/volumes/<id>.json    a volume's record (written last on create, removed last on delete)
  .berth/volumes/<id>.copying a create from a source whose copy has started (its name, subDir)
  .berth/claims/<hash>.json   which volume owns a subDir (so two volumes never share one)
  .berth/claims/<hash>.below/ volumes below a directory (so no volume holds another)
  .berth/snapshots/<id>.json  a snapshot's record, written when its copy starts
  .berth/snapshots/<id>/      the snapshot's copy, renamed into place only once complete
  .berth/snapshots/<id>.extents  where the data of its large files lies, written before it
  .berth/attachments/<id>.json  the nodes an image volume is published to (ControllerPublish)
  .berth/nodes/<node>.json    a node of this driver that registered (at NodeGetInfo)
  .berth/tmp/                 copies in progress
  .berth/trash/               deleted directories, purged in the background

The record, not the directory, says a volume exists: a directory without one is data a `retain`
delete left behind, which a new volume with the same subDir adopts. IDs are derived from request
names, so a retried CreateVolume finds the same record, and a retried DeleteVolume of a deleted
volume finds nothing even when a new volume now uses the same subDir.
NFSv3 has no extended attributes, hence the small JSON files beside the data.
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from ... import errors
from ..base import Provisioner
from .libnfs import Connection, NfsError

META = "/.berth"
VOLUMES, SNAPSHOTS, CLAIMS, TMP, TRASH, ATTACHMENTS, NODES = (
    f"{META}/{d}" for d in ("volumes", "snapshots", "claims", "tmp", "trash", "attachments",
                            "nodes"))

K8S = "csi.storage.k8s.io/"
# A create retried by the provisioner refreshes its claim at least this often (its backoff tops
# out at minutes); a claim without a record untouched for longer was abandoned. The default of
# the backend's abandonAfterSeconds.
PENDING_TTL = 3600.0
# Template variables and the external-provisioner metadata parameter that fills each.
TEMPLATE_VARS = {
    "pvc.metadata.name": K8S + "pvc/name",
    "pvc.metadata.namespace": K8S + "pvc/namespace",
    "pv.metadata.name": K8S + "pv/name",
}
_VAR_RE = re.compile(r"\$\{([^}]*)\}")


@dataclass
class VolumeRecord:
    name: str
    sub_dir: str
    size: int
    parameters: dict[str, str]
    on_delete: str
    context: dict[str, str]
    source_kind: str = ""
    source_id: str = ""
    created: float = field(default_factory=time.time)
    layout: str = "directory"  # or "image": <subDir>/disk.img on a loop device
    block: bool = False  # image volumes only: raw block access instead of a filesystem
    # ControllerModifyVolume's mountOptions/nfsVersion: over `context` at the next NodeStage
    # (the CO keeps passing CreateVolume's context, so the node reads them from here).
    mutable: dict[str, str] = field(default_factory=dict)


@dataclass
class SnapshotRecord:
    name: str
    source_volume: str
    size: int
    created: float = field(default_factory=time.time)
    layout: str = "directory"  # the source's, so a restore is of the same kind
    block: bool = False


def render_sub_dir(template: str, claim: Provisioner, volume_name: str) -> str:
    """The volume's directory relative to the share; INVALID_ARGUMENT if it is not a plain path
    inside the share (no `..`, no absolute path, not our metadata)."""

    def value(match: re.Match[str]) -> str:
        var = match.group(1)
        if var not in TEMPLATE_VARS:
            raise errors.InvalidArgument(
                f"subDir {template!r}: unknown variable ${{{var}}}; known: "
                + ", ".join(f"${{{v}}}" for v in TEMPLATE_VARS)
            )
        got = {"pvc.metadata.name": claim.pvc_name,
               "pvc.metadata.namespace": claim.pvc_namespace,
               "pv.metadata.name": claim.pv_name or volume_name}[var]
        if not got:
            raise errors.InvalidArgument(
                f"subDir {template!r} uses ${{{var}}} but the request has no "
                f"{TEMPLATE_VARS[var]} parameter; run external-provisioner with "
                "--extra-create-metadata"
            )
        return got

    rendered = _VAR_RE.sub(value, template)
    parts = rendered.split("/")
    if (not rendered or rendered.startswith("/") or any(p in ("", ".", "..") for p in parts)
            or parts[0] == META.strip("/") or any(len(p.encode()) > 255 for p in parts)
            or "\0" in rendered):
        raise errors.InvalidArgument(
            f"subDir {template!r} gives {rendered!r}, which is not a relative path inside the "
            "share (no empty, '.' or '..' parts, no leading '/', not .berth)"
        )
    return rendered


def prepare(conn: Connection) -> None:
    for d in (VOLUMES, SNAPSHOTS, CLAIMS, TMP, TRASH, ATTACHMENTS, NODES):
        conn.makedirs(d, 0o700)


def read_json(conn: Connection, path: str) -> dict[str, Any] | None:
    try:
        data = json.loads(conn.read_file(path))
    except NfsError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return data if isinstance(data, dict) else None


def read_text(conn: Connection, path: str) -> str:
    """A small file's text, stripped; "" when it is not there."""
    try:
        return conn.read_file(path).decode(errors="replace").strip()
    except NfsError as exc:
        if exc.errno == errno.ENOENT:
            return ""
        raise


def write_json(conn: Connection, path: str, data: dict[str, Any]) -> None:
    """Write atomically: a reader sees the old record or the new one, never half of one."""
    tmp = f"{TMP}/{uuid.uuid4().hex}.json"
    conn.write_file(tmp, json.dumps(data, separators=(",", ":")).encode())
    conn.rename(tmp, path)


def remove(conn: Connection, path: str) -> None:
    try:
        conn.unlink(path)
    except NfsError as exc:
        if exc.errno != errno.ENOENT:
            raise


def volume_record(conn: Connection, local_id: str) -> VolumeRecord | None:
    data = read_json(conn, f"{VOLUMES}/{local_id}.json")
    return VolumeRecord(**data) if data is not None else None


def save_volume(conn: Connection, local_id: str, rec: VolumeRecord) -> None:
    write_json(conn, f"{VOLUMES}/{local_id}.json", asdict(rec))


def snapshot_record(conn: Connection, local_id: str) -> SnapshotRecord | None:
    data = read_json(conn, f"{SNAPSHOTS}/{local_id}.json")
    return SnapshotRecord(**data) if data is not None else None


def save_snapshot(conn: Connection, local_id: str, rec: SnapshotRecord) -> None:
    write_json(conn, f"{SNAPSHOTS}/{local_id}.json", asdict(rec))


def ids(conn: Connection, kind_dir: str) -> list[str]:
    return sorted(n[:-5] for n, _ in conn.listdir(kind_dir) if n.endswith(".json"))


def to_trash(conn: Connection, path: str) -> bool:
    """Move `path` out of sight; False when it was not there."""
    try:
        conn.rename(path, f"{TRASH}/{uuid.uuid4().hex}")
    except NfsError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def _claim_path(sub_dir: str) -> str:
    from ... import ids

    return f"{CLAIMS}/{ids.local_id_for_name(sub_dir)}"


def age(conn: Connection, path: str) -> float | None:
    """Seconds since `path` was last written (or marked), None when it is not there."""
    try:
        return time.time() - conn.lstat(path).mtime_ns / 1e9
    except NfsError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise


def claim_age(conn: Connection, sub_dir: str, name: str) -> float | None:
    """How long ago volume `name`'s create last claimed `sub_dir` (every retry refreshes it);
    None when the claim is not (or no longer) that volume's."""
    path = _claim_path(sub_dir) + ".json"
    if (read_json(conn, path) or {}).get("name") != name:
        return None
    return age(conn, path)


def _alive(conn: Connection, local_id: str, mark: str, ttl: float) -> bool:
    """Whether volume `local_id`, which wrote `mark` (its claim or a marker), exists or is being
    made: every CreateVolume call refreshes its marks, so only an abandoned create's go stale."""
    if not local_id:
        return False
    if conn.exists(f"{VOLUMES}/{local_id}.json"):
        return True
    since = age(conn, mark)
    return since is not None and since < ttl


def _ancestors(sub_dir: str) -> list[str]:
    parts = sub_dir.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _mark(conn: Connection, path: str) -> bool:
    """Create `path` empty, or refresh its time; True when this call created it."""
    try:
        with conn.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600):
            return True
    except NfsError as exc:
        if exc.errno != errno.EEXIST:
            raise
    now = time.time_ns()
    conn.lutimes(path, now, now)
    return False


def claim(conn: Connection, sub_dir: str, name: str, local_id: str,
          ttl: float = PENDING_TTL) -> None:
    """Make volume `name` the owner of `sub_dir`; ALREADY_EXISTS if another volume owns it, a
    directory above it or one below it (a volume inside another would be exposed to its pod and
    trashed with it). A claim whose owner has no record and that no CreateVolume has refreshed
    for `ttl` seconds was abandoned, and is taken over.

    Each directory above a claimed one holds a marker `<claim>.below/<owner-id>`, so a claim of
    that directory finds its descendants without scanning every claim."""
    # Write first, check after: of two creates racing (one above the other), the later
    # check sees the earlier write, whichever process it runs in.
    made = []
    for parent in _ancestors(sub_dir):
        marker_dir = _claim_path(parent) + ".below"
        try:
            conn.mkdir(marker_dir, 0o700)
        except NfsError as exc:
            if exc.errno != errno.EEXIST:
                raise
        if _mark(conn, f"{marker_dir}/{local_id}"):
            made.append(f"{marker_dir}/{local_id}")
    path = _claim_path(sub_dir) + ".json"
    try:
        if _take(conn, path, sub_dir, name, local_id, ttl):
            made.append(path)
        for parent in _ancestors(sub_dir):
            parent_claim = _claim_path(parent) + ".json"
            owner = read_json(conn, parent_claim) or {}
            if owner.get("name") != name and _alive(conn, str(owner.get("volume", "")),
                                                     parent_claim, ttl):
                raise errors.AlreadyExists(
                    f"subDir {sub_dir!r} is inside {parent!r}, the directory of volume "
                    f"{owner.get('name')!r}")
        below = _claim_path(sub_dir) + ".below"
        try:
            for marker, _ in conn.listdir(below):
                if marker != local_id and _alive(conn, marker, f"{below}/{marker}", ttl):
                    raise errors.AlreadyExists(
                        f"subDir {sub_dir!r} holds the directory of another volume ({marker})")
        except NfsError as exc:
            if exc.errno != errno.ENOENT:
                raise
    except errors.AlreadyExists:
        for made_path in made:
            remove(conn, made_path)
        raise


def _take(conn: Connection, path: str, sub_dir: str, name: str, local_id: str, ttl: float
          ) -> bool:
    """Own the claim file; True when this call wrote it."""
    mine = json.dumps({"name": name, "volume": local_id}).encode()
    try:
        with conn.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600) as fh:
            conn.pwrite(fh, 0, mine)
        return True
    except NfsError as exc:
        if exc.errno != errno.EEXIST:
            raise
    owner = read_json(conn, path) or {}
    if owner.get("name") == name:
        now = time.time_ns()
        conn.lutimes(path, now, now)  # a retry: still being made
        return False
    if _alive(conn, str(owner.get("volume", "")), path, ttl):
        raise errors.AlreadyExists(
            f"subDir {sub_dir!r} already belongs to volume {owner.get('name')!r}")
    write_json(conn, path, {"name": name, "volume": local_id})
    return True


def release(conn: Connection, sub_dir: str, name: str, local_id: str) -> None:
    path = _claim_path(sub_dir) + ".json"
    if (read_json(conn, path) or {}).get("name") == name:
        remove(conn, path)
    for parent in _ancestors(sub_dir):
        marker_dir = _claim_path(parent) + ".below"
        remove(conn, f"{marker_dir}/{local_id}")
        try:
            conn.rmdir(marker_dir)
        except NfsError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                raise


# Beside a snapshot's copy: the data ranges of its large files, as the copy wrote them. A
# snapshot is never written again, so a restore reads just those ranges: libnfs cannot
# SEEK_DATA, and reading the holes of a 10 GiB image takes seconds where its data takes
# milliseconds.
_MAX_EXTENTS = 100_000  # beyond this, a map costs more to read than it saves


def data_map_path(snapshot_dir: str) -> str:
    return f"{snapshot_dir}.extents"  # not .json: that names records


def save_data_map(conn: Connection, copy: str, path: str,
                  data_map: dict[str, list[tuple[int, int]]]) -> None:
    """Record `data_map` (path below `copy` -> extents) at `path`, with each file's size."""
    files = {}
    for rel, extents in data_map.items():
        if len(extents) > _MAX_EXTENTS:
            continue
        files[rel] = {"size": conn.lstat(f"{copy}/{rel}").size, "extents": extents}
    write_json(conn, path, {"version": 1, "files": files})


def load_data_map(conn: Connection, snapshot_dir: str) -> dict[str, list[tuple[int, int]]]:
    """The map saved with a snapshot, for its files still the size it recorded."""
    data = read_json(conn, data_map_path(snapshot_dir))
    out: dict[str, list[tuple[int, int]]] = {}
    if data is None or data.get("version") != 1:
        return out
    for rel, entry in data.get("files", {}).items():
        try:
            if conn.lstat(f"{snapshot_dir}/{rel}").size == entry["size"]:
                out[rel] = [(int(a), int(b)) for a, b in entry["extents"]]
        except (NfsError, KeyError, TypeError, ValueError):
            continue
    return out


# -- attachments: an image volume's nodes ------------------------------------------------------
def attachments(conn: Connection, local_id: str) -> dict[str, dict[str, Any]]:
    """node id -> {"mode", "block", "fsType", "flags", "readonly"} of each publish."""
    data = read_json(conn, f"{ATTACHMENTS}/{local_id}.json") or {}
    nodes = data.get("nodes", {})
    return nodes if isinstance(nodes, dict) else {}


def save_attachments(conn: Connection, local_id: str, nodes: dict[str, dict[str, Any]]) -> None:
    if nodes:
        write_json(conn, f"{ATTACHMENTS}/{local_id}.json", {"nodes": nodes})
    else:
        remove(conn, f"{ATTACHMENTS}/{local_id}.json")


def register_node(conn: Connection, node_id: str) -> None:
    conn.makedirs(NODES, 0o700)
    write_json(conn, f"{NODES}/{node_id}.json", {"registered": time.time()})


def node_registered(conn: Connection, node_id: str) -> bool:
    return conn.exists(f"{NODES}/{node_id}.json")
