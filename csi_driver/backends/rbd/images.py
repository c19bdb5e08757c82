"""RBD images as Berth records: naming, the record, clone v2 chains, removal through the trash.

  csi-vol-<id>    a volume
  csi-snap-<id>   a snapshot: a clone of its source volume, carrying the snapshot `restore` that
                  restores clone from

The record is the image-meta key `berth` (JSON), written last: an image without it is a half-made
one from a crashed create, and the retry removes it and starts again. We read and write it as
librbd stores image-meta (omap key `metadata_berth` of the image's header object) through plain
RADOS calls: ~1 ms instead of the ~10 ms of opening the image and taking its exclusive lock, which
would be most of a CreateVolume. `rbd image-meta get POOL/IMAGE berth` shows it.

Deleting moves an image to the RBD trash (~13 ms) and a background purger removes it for good; an
image whose snapshots still have clones (clone v2) stays there until its last dependent is gone.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import struct
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ... import errors

log = logging.getLogger(__name__)
VOLUME_PREFIX, SNAPSHOT_PREFIX = "csi-vol-", "csi-snap-"
RESTORE_SNAP = "restore"
RECORD_KEY = "metadata_berth"  # librbd's image-meta key "berth"
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
    rec = ImageRecord(image=image, **{k: v for k, v in data.items() if k != "image"})
    rec.size = struct.unpack("<Q", omap["size"])[0]
    rec.qos = {k[len("metadata_conf_"):]: v.decode() for k, v in omap.items()
               if k[len("metadata_conf_"):] in QOS_KEYS}
    return rec


def complete(ctx: Any, rec: ImageRecord) -> None:
    """Write the record, which marks the image complete."""
    import rados

    iid = image_id(ctx, rec.image)
    data = {k: v for k, v in asdict(rec).items() if k not in ("image", "size", "qos")}
    with rados.WriteOpCtx() as op:
        ctx.set_omap(op, (RECORD_KEY,), (json.dumps(data).encode(),))
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


def in_trash(ctx: Any, iid: str) -> bool:
    import rbd

    try:
        rbd.RBD().trash_get(ctx, iid)
    except rbd.ImageNotFound:
        return False
    return True


class Purger:
    """Removes trashed images in the background, then any trashed ancestor nothing needs now.

    `call(creds, fn)` runs fn(ioctx) with the credentials of the request that deleted the image;
    they stay in memory only. Anything left after a crash is found again by `sweep`.
    """

    def __init__(self, call: Callable[[Any, str, Callable[[Any], Any]], Any]) -> None:
        self._call = call
        self._queue: queue.Queue[tuple[Any, str]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="rbd-purger", daemon=True)
        self._thread.start()
        self.idle = threading.Event()
        self.idle.set()

    def add(self, creds: Any, iid: str) -> None:
        self.idle.clear()
        self._queue.put((creds, iid))

    def sweep(self, creds: Any) -> None:
        """Queue every trashed image of ours (after a restart, or when a dependent went)."""
        import rbd

        listed = self._call(creds, "listing the trash", lambda ctx: list(rbd.RBD().trash_list(ctx)))
        for entry in listed:
            if entry["name"].startswith((VOLUME_PREFIX, SNAPSHOT_PREFIX)):
                self.add(creds, entry["id"])

    def _run(self) -> None:
        while True:
            creds, iid = self._queue.get()
            try:
                self._call(creds, f"purging trashed image {iid}",
                           functools.partial(self._purge, iid=iid))
            except errors.CsiError as exc:
                log.debug("image %s stays in the trash for now: %s", iid, exc.message)
            except Exception:
                log.exception("purging trashed image %s failed", iid)
            if self._queue.empty():
                self.idle.set()

    @staticmethod
    def _purge(ctx: Any, *, iid: str) -> None:
        import rbd

        while iid and in_trash(ctx, iid):
            try:
                iid = purge(ctx, iid)
            except (rbd.ImageHasSnapshots, rbd.ImageBusy, rbd.InvalidArgument):
                return  # clones still read from it: it goes when they do
