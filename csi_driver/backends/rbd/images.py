"""RBD images as Berth records: naming, the record, clone v2 chains, removal through the trash.

  csi-vol-<id>    a volume (volumeNamePrefix, default csi-vol-)
  csi-snap-<id>   a snapshot (snapshotNamePrefix, default csi-snap-): a clone of its source
                  volume, carrying the snapshot `restore` that restores clone from

The record is the image-meta key `berth` (JSON), written last: an image without it is a half-made
one from a crashed create, and the retry removes it and starts again. We read and write it as
librbd stores image-meta (omap key `metadata_berth` of the image's header object) through plain
RADOS calls: ~1 ms instead of the ~10 ms of opening the image and taking its exclusive lock, which
would be most of a CreateVolume. `rbd image-meta get POOL/IMAGE berth` shows it.

Deleting moves an image to the RBD trash (~13 ms) and a background purger removes it for good; an
image whose snapshots still have clones (clone v2) stays there until its last dependent is gone.
The purger removes only trashed images that carry our prefix *and* our record: other clients
(ceph-csi names its images csi-vol-<uuid> too) share pools with us.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import queue
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ... import errors

log = logging.getLogger(__name__)
RESTORE_SNAP = "restore"
RECORD_KEY = "metadata_berth"  # librbd's image-meta key "berth"
# The nodes a volume is published to (JSON {node: attachment}), image-meta "berth.attach",
# read and written the same way as the record (`rbd image-meta get POOL/IMAGE berth.attach`).
ATTACH_KEY = "metadata_berth.attach"
QOS_KEYS = ("rbd_qos_iops_limit", "rbd_qos_bps_limit", "rbd_qos_read_iops_limit",
            "rbd_qos_write_iops_limit", "rbd_qos_read_bps_limit", "rbd_qos_write_bps_limit")


@dataclass
class ImageRecord:
    image: str
    name: str
    size: int = 0
    parameters: dict[str, str] = field(default_factory=dict)
    source: str = ""  # volumes: "snapshot:<id>" | "volume:<id>"; snapshots: the volume's id
    depth: int = 0  # clone ancestors
    created: float = 0.0
    block: bool = False  # made for raw block access (else for a filesystem)
    qos: dict[str, str] = field(default_factory=dict)
    attached: dict[str, dict[str, Any]] = field(default_factory=dict)  # ATTACH_KEY, not stored


def image_id(ctx: Any, image: str) -> str | None:
    import rados

    try:
        raw = ctx.read(f"rbd_id.{image}")
    except rados.ObjectNotFound:
        return None
    (length,) = struct.unpack_from("<I", raw)  # a length-prefixed string
    return bytes(raw[4:4 + length]).decode()


def read(ctx: Any, image: str) -> ImageRecord | bool | None:
    """The record, None when there is no such image, False for a half-made one."""
    import rados

    iid = image_id(ctx, image)
    if iid is None:
        return None
    with rados.ReadOpCtx() as op:
        values, _ = ctx.get_omap_vals(op, "", "", 512)
        try:
            ctx.operate_read_op(op, f"rbd_header.{iid}")
        except rados.ObjectNotFound:
            return None  # removed between the two reads
        omap = dict(values)
    if RECORD_KEY not in omap:
        return False
    data = json.loads(omap[RECORD_KEY])
    if data.get("discarded"):
        return False  # a half-made image on its way to the trash
    rec = ImageRecord(image=image, **{k: v for k, v in data.items() if k != "image"})
    rec.size = struct.unpack("<Q", omap["size"])[0]
    rec.qos = {k[len("metadata_conf_"):]: v.decode() for k, v in omap.items()
               if k[len("metadata_conf_"):] in QOS_KEYS}
    rec.attached = _attachments(omap.get(ATTACH_KEY))
    return rec


def _attachments(raw: bytes | None) -> dict[str, dict[str, Any]]:
    found = json.loads(raw) if raw else {}
    return found if isinstance(found, dict) else {}


def attachments(ctx: Any, image: str) -> dict[str, dict[str, Any]]:
    """The nodes an image is published to ({} for none, or no such image)."""
    import rados

    iid = image_id(ctx, image)
    if iid is None:
        return {}
    with rados.ReadOpCtx() as op:
        values, _ = ctx.get_omap_vals_by_keys(op, (ATTACH_KEY,))
        try:
            ctx.operate_read_op(op, f"rbd_header.{iid}")
        except rados.ObjectNotFound:
            return {}
        return _attachments(dict(values).get(ATTACH_KEY))


def save_attachments(ctx: Any, image: str, nodes: dict[str, dict[str, Any]]) -> None:
    """Write (or, for none, remove) the image's attachments."""
    import rados

    iid = image_id(ctx, image)
    if iid is None:
        raise errors.NotFound(f"image {image} does not exist")
    with rados.WriteOpCtx() as op:
        if nodes:
            ctx.set_omap(op, (ATTACH_KEY,), (json.dumps(nodes).encode(),))
        else:
            ctx.remove_omap_keys(op, (ATTACH_KEY,))
        ctx.operate_write_op(op, f"rbd_header.{iid}")


def complete(ctx: Any, rec: ImageRecord) -> None:
    """Write the record, which marks the image complete."""
    import rados

    iid = image_id(ctx, rec.image)
    data = {k: v for k, v in asdict(rec).items()
            if k not in ("image", "size", "qos", "attached")}
    with rados.WriteOpCtx() as op:
        ctx.set_omap(op, (RECORD_KEY,), (json.dumps(data).encode(),))
        ctx.operate_write_op(op, f"rbd_header.{iid}")


def recorded(ctx: Any, iid: str) -> bool:
    """Whether the image with ID `iid` (in the trash or not) carries our record."""
    import rados

    with rados.ReadOpCtx() as op:
        values, _ = ctx.get_omap_vals_by_keys(op, (RECORD_KEY,))
        try:
            ctx.operate_read_op(op, f"rbd_header.{iid}")
        except rados.ObjectNotFound:
            return False
        return any(k == RECORD_KEY for k, _ in values)


def _mark_discarded(ctx: Any, iid: str) -> None:
    """Give a half-made image (no record yet) a record that says so, so that the purger knows it
    for ours after a restart too; `read` still calls it half-made."""
    import rados

    with rados.WriteOpCtx() as op:
        ctx.set_omap(op, (RECORD_KEY,), (json.dumps({"discarded": True}).encode(),))
        with contextlib.suppress(rados.ObjectNotFound):  # gone meanwhile
            ctx.operate_write_op(op, f"rbd_header.{iid}")


def features(rbd_api: Any, names: str) -> int:
    try:
        return int(rbd_api.features_from_string(names))
    except Exception:
        raise errors.InvalidArgument(f"imageFeatures {names!r} names an unknown RBD feature"
                                     ) from None


def clone(ctx: Any, parent: str, parent_snap: str, child: str, feature_bits: int) -> None:
    import rbd

    rbd.RBD().clone(ctx, parent, parent_snap, ctx, child, features=feature_bits)


def watchers(ctx: Any, image: str, ignore: set[int]) -> list[str]:
    """Addresses of the clients that have `image` open, except the client IDs in `ignore`."""
    import rbd

    try:
        with rbd.Image(ctx, image, read_only=True) as img:
            return [w["addr"] for w in img.watchers_list() if int(w["id"]) not in ignore]
    except rbd.ImageNotFound:
        return []


def to_trash(ctx: Any, image: str) -> str | None:
    """Move an image to the trash; its ID for the purger, or None if it was gone already."""
    import rbd

    iid = image_id(ctx, image)
    if iid is None:
        return None
    if not recorded(ctx, iid):
        _mark_discarded(ctx, iid)
    try:
        rbd.RBD().trash_move(ctx, image, 0)
    except rbd.ImageNotFound:
        return None
    return iid


def purge(ctx: Any, iid: str) -> str:
    """Remove a trashed image for good if nothing depends on it; its parent's ID ("" if none),
    so that the caller can try the parent next. Raises when it is still needed."""
    import rbd

    with rbd.Image(ctx, image_id=iid) as img:
        try:
            parent = str(img.parent_id())
        except rbd.ImageNotFound:
            parent = ""
        for snap in list(img.list_snaps()):
            if snap.get("namespace", rbd.RBD_SNAP_NAMESPACE_TYPE_USER) == \
                    rbd.RBD_SNAP_NAMESPACE_TYPE_USER:
                img.remove_snap(snap["name"])  # clone v2: one with clones goes to the trash
    rbd.RBD().trash_remove(ctx, iid, False)
    return parent


BUSY_RETRY_MAX_S = 10.0  # a dead client's watch lasts 30 s: retry soon after it is gone


class _Busy(Exception):
    """A trashed image still has watchers: retry it later."""


class Purger:
    """Removes trashed images of ours in the background, then any trashed ancestor nothing needs
    now, with `workers` threads: without an object map, librbd removes every object a trashed
    image could have (2,560 for 10 GiB), so one image at a time cannot keep up with deletes.

    `call(creds, what, fn)` runs fn(ioctx) with the credentials of the request that deleted the
    image (or the config's); they stay in memory only. Anything left after a crash or a restart is
    found again by `sweep`, and every `resweep_s` for every credential seen, so an image whose
    purge failed (cluster away, a dependent purged at the same moment) is not left for ever. An
    image with watchers is retried sooner, with back-off: a client killed while it had the image
    open (our own purger, kill -9) keeps its watch for 30 s (osd_client_watch_timeout).
    """

    def __init__(self, call: Callable[[Any, str, Callable[[Any], Any]], Any],
                 prefixes: tuple[str, str], workers: int = 4, resweep_s: float = 300.0) -> None:
        self._call = call
        self._prefixes = prefixes
        self._resweep_s = resweep_s
        self._queue: queue.Queue[tuple[Any, str]] = queue.Queue()
        self._lock = threading.Lock()
        self._pending: set[str] = set()  # queued, being purged or waiting: added once
        self._later: dict[str, tuple[Any, float, float]] = {}  # iid -> creds, when, back-off
        self._creds: dict[Any, float] = {}  # credentials swept with -> when
        self.idle = threading.Event()
        self.idle.set()
        for n in range(workers):
            threading.Thread(target=self._run, name=f"rbd-purger-{n}", daemon=True).start()
        threading.Thread(target=self._timer, name="rbd-purge-timer", daemon=True).start()

    def waiting(self) -> int:
        """Images queued, being purged, or waiting on a dependent clone."""
        return len(self._pending)

    def add(self, creds: Any, iid: str) -> None:
        with self._lock:
            if iid in self._pending:
                return
            self._pending.add(iid)
            self.idle.clear()
        self._queue.put((creds, iid))

    def sweep(self, creds: Any) -> None:
        """Queue every trashed image with our prefix (the record is checked before its purge)."""
        import rbd

        listed = self._call(creds, "listing the trash", lambda ctx: list(rbd.RBD().trash_list(ctx)))
        with self._lock:
            self._creds[creds] = time.monotonic()
        for entry in listed:
            if entry["name"].startswith(self._prefixes):
                self.add(creds, entry["id"])

    def _timer(self) -> None:
        while True:
            time.sleep(1.0)
            now = time.monotonic()
            with self._lock:
                due = [(iid, c) for iid, (c, t, _) in self._later.items() if t <= now]
                sweeps = [c for c, t in self._creds.items() if now - t >= self._resweep_s]
            for iid, creds in due:
                self._queue.put((creds, iid))  # still in _pending: no sweep adds it twice
            for creds in sweeps:
                try:
                    self.sweep(creds)
                except Exception as exc:  # a cluster away now: the next round tries again
                    with self._lock:
                        self._creds[creds] = time.monotonic()
                    log.debug("sweeping the trash failed: %s", exc)

    def _run(self) -> None:
        while True:
            creds, iid = self._queue.get()
            with self._lock:
                _, _, backoff = self._later.pop(iid, (None, 0.0, 1.0))
            try:
                self._call(creds, f"purging trashed image {iid}",
                           functools.partial(self._purge, iid=iid))
            except _Busy:
                backoff = min(backoff * 2, BUSY_RETRY_MAX_S)
                with self._lock:
                    self._later[iid] = (creds, time.monotonic() + backoff, backoff)
                log.debug("image %s has watchers: purge again in %.0f s", iid, backoff)
                continue
            except errors.CsiError as exc:
                log.debug("image %s stays in the trash for now: %s", iid, exc.message)
            except Exception:
                log.exception("purging trashed image %s failed", iid)
            with self._lock:
                self._pending.discard(iid)
                if not self._pending:
                    self.idle.set()

    def _ours(self, ctx: Any, iid: str) -> bool:
        import rbd

        try:
            name = str(rbd.RBD().trash_get(ctx, iid)["name"])
        except rbd.ImageNotFound:
            return False  # not (or no longer) in the trash
        return name.startswith(self._prefixes) and recorded(ctx, iid)

    def _purge(self, ctx: Any, *, iid: str) -> None:
        import rbd

        first = iid
        while iid and self._ours(ctx, iid):
            try:
                iid = purge(ctx, iid)
            except rbd.ImageBusy:
                if iid == first:
                    raise _Busy() from None
                return  # an ancestor in use: whoever uses it goes through here again
            except (rbd.ImageHasSnapshots, rbd.InvalidArgument):
                return  # clones still read from it: it goes when they do
            except rbd.ImageNotFound:
                return  # another worker purged it first
