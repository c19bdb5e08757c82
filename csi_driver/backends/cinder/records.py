"""What Berth keeps in a Cinder volume's metadata, and Cinder's JSON turned into our types.

Metadata keys (values are at most 255 characters, Cinder's limit):
  berth.name / berth.backend   the CSI name and the backend that made it: a volume without
                               them is not ours (it is never listed, modified or deleted)
  berth.block                  "1" for a raw block volume
  berth.params                 the StorageClass parameters it was made with (JSON)
  berth.attach.<node>          an attachment (JSON): {"a": Cinder attachment ID, "s": server ID,
                               "p": 1 while it is being made, plus the capability}
"""

from __future__ import annotations

import calendar
import json
import re
import time
from collections.abc import Mapping
from typing import Any

from ... import errors
from ..base import Attachment, Condition, Segments, Snapshot, Source, Volume

GiB = 1 << 30
NAME, BACKEND, BLOCK, PARAMS, MUTABLE = (
    "berth.name", "berth.backend", "berth.block", "berth.params", "berth.mutable")
ATTACH = "berth.attach."
_MAX_VALUE = 255
# Statuses a volume passes through; sitting in one this long means something is stuck.
_TRANSIENT = {"creating", "attaching", "detaching", "reserved", "extending", "retyping",
              "deleting", "downloading", "uploading", "maintenance", "backing-up",
              "restoring-backup"}
_STUCK_AFTER = 600.0


_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def is_uuid(text: str) -> bool:
    """Cinder's IDs are UUIDs; anything else names no volume (and must not reach a URL)."""
    return bool(_UUID.fullmatch(text))


def ours(data: Mapping[str, Any], backend: str) -> bool:
    md = data.get("metadata") or {}
    return bool(md.get(NAME)) and md.get(BACKEND) == backend


def gib(size: int) -> int:
    """Cinder sizes are whole GiB."""
    return max(1, -(-size // GiB))


def value(data: Any) -> str:
    text = json.dumps(data, separators=(",", ":"), sort_keys=True)
    if len(text) > _MAX_VALUE:
        raise errors.InvalidArgument(
            f"{text[:60]}...: too long for Cinder metadata (at most {_MAX_VALUE} characters); "
            "use fewer or shorter parameters or mount flags")
    return text


def attachments(md: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    found = {}
    for key, raw in md.items():
        if key.startswith(ATTACH):
            try:
                found[key[len(ATTACH):]] = dict(json.loads(raw))
            except (ValueError, TypeError):
                continue
    return found


def attachment_record(attachment: Attachment, **extra: Any) -> dict[str, Any]:
    return {**attachment.to_record(), **extra}


def _timestamp(text: str | None) -> float:
    if not text:
        return 0.0
    try:
        return float(calendar.timegm(time.strptime(text.split(".")[0], "%Y-%m-%dT%H:%M:%S")))
    except ValueError:
        return 0.0


def condition(data: Mapping[str, Any]) -> Condition:
    status = str(data.get("status", ""))
    if status.startswith("error"):
        return Condition(True, f"Cinder reports the volume as {status}")
    if status in _TRANSIENT:
        since = _timestamp(data.get("updated_at"))
        if since and time.time() - since > _STUCK_AFTER:
            return Condition(True, f"the volume has been {status} since {data['updated_at']}Z")
    return Condition(False, "")


def volume(data: Mapping[str, Any], zone_key: str, zoned: bool) -> Volume:
    md: Mapping[str, str] = data.get("metadata") or {}
    source = (Source("snapshot", data["snapshot_id"]) if data.get("snapshot_id")
              else Source("volume", data["source_volid"]) if data.get("source_volid") else None)
    zone = data.get("availability_zone") or ""
    topology: tuple[Segments, ...] = ({zone_key: zone},) if zoned and zone else ()
    return Volume(
        local_id=str(data["id"]), name=md.get(NAME, ""), size=int(data.get("size") or 0) * GiB,
        parameters=_json_map(md.get(PARAMS)),
        context={"availabilityZone": zone, "type": str(data.get("volume_type") or "")},
        source=source, block=md.get(BLOCK) == "1",
        mutable_parameters=_json_map(md.get(MUTABLE)),
        condition=condition(data),
        published=published(md),
        topology=topology,
    )


def published(md: Mapping[str, str]) -> tuple[Attachment, ...]:
    """The made (not pending) attachments; a record someone mangled counts as none."""
    found = []
    for node, record in sorted(attachments(md).items()):
        if record.get("p"):
            continue
        try:
            found.append(Attachment.from_record(node, record))
        except (ValueError, TypeError):
            continue
    return tuple(found)


def _json_map(raw: str | None) -> dict[str, str]:
    """A map Berth wrote as JSON; {} when someone edited it into something else."""
    try:
        found = json.loads(raw or "{}")
    except ValueError:
        return {}
    if not isinstance(found, dict):
        return {}
    return {str(k): str(v) for k, v in found.items()}


def snapshot(data: Mapping[str, Any]) -> Snapshot:
    md: Mapping[str, str] = data.get("metadata") or {}
    return Snapshot(local_id=str(data["id"]), name=md.get(NAME, ""),
                    source_volume=str(data.get("volume_id", "")),
                    size=int(data.get("size") or 0) * GiB,
                    created_at=_timestamp(data.get("created_at")),
                    ready=data.get("status") == "available")
