"""Berth's record of each volume and snapshot: a small RADOS object (JSON) in the filesystem's
metadata pool, in a namespace of its own (`berth.<group>`).

One librados read or write (~1 ms) instead of the volumes module's metadata commands (5-16 ms,
queued behind every other mgr call), and a global index of snapshot names, which CSI needs
(a name is unique across volumes) and subvolume snapshots, living under their volume, lack.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

VOLUME, SNAPSHOT = "vol.", "snap."


@dataclass
class VolumeRecord:
    name: str
    size: int
    path: str = ""  # the subvolume's data path, from getpath
    parameters: dict[str, str] = field(default_factory=dict)
    source: str = ""  # "snapshot:<id>" | "volume:<id>" | ""
    mutable: dict[str, str] = field(default_factory=dict)
    # "complete", or "cloning" while the subvolume is an unfinished clone
    state: str = "complete"


@dataclass
class SnapshotRecord:
    name: str
    volume: str  # local ID of the source volume
    size: int
    created: float
    state: str = "complete"  # or "creating", written before the Ceph snapshot is taken


def namespace(group: str) -> str:
    return f"berth.{group}"


def _read(ctx: Any, obj: str) -> dict[str, Any] | None:
    import rados

    try:
        raw = ctx.read(obj, 1 << 20)
    except rados.ObjectNotFound:
        return None
    data = json.loads(raw)
    return data if isinstance(data, dict) else None


def read_volume(ctx: Any, local_id: str) -> VolumeRecord | None:
    data = _read(ctx, VOLUME + local_id)
    return None if data is None else VolumeRecord(**data)


def read_snapshot(ctx: Any, local_id: str) -> SnapshotRecord | None:
    data = _read(ctx, SNAPSHOT + local_id)
    return None if data is None else SnapshotRecord(**data)


def write(ctx: Any, kind: str, local_id: str, rec: VolumeRecord | SnapshotRecord) -> None:
    ctx.write_full(kind + local_id, json.dumps(asdict(rec), sort_keys=True).encode())


def remove(ctx: Any, kind: str, local_id: str) -> None:
    import rados

    with contextlib.suppress(rados.ObjectNotFound):
        ctx.remove_object(kind + local_id)


def local_ids(ctx: Any, kind: str) -> Iterator[str]:
    """Every local ID with a record of `kind`, sorted."""
    names = sorted(o.key for o in ctx.list_objects() if o.key.startswith(kind))
    return (n[len(kind):] for n in names)
