"""Volume and snapshot IDs: `<backend>:<local-id>`.

The ID is all a stateless controller gets back, so it names the backend that owns the object and
the backend's own key for it. IDs are parsed and validated before anything touches storage: the
local part has no `/` and cannot start with a dot, so it can be used as a single path component.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from .errors import InvalidArgument

MAX_ID_BYTES = 128
BACKEND_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# A node ID is also a topology value: at most 63 characters, alphanumeric at both ends.
NODE_ID_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_LOCAL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SLUG_UNSAFE = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True, slots=True)
class ObjectId:
    backend: str
    local: str

    def __str__(self) -> str:
        return f"{self.backend}:{self.local}"


def parse(raw: str) -> ObjectId | None:
    """The parsed ID, or None when `raw` is not one of ours (callers decide what that means)."""
    if not raw or len(raw.encode()) > MAX_ID_BYTES:
        return None
    backend, sep, local = raw.partition(":")
    if not sep or not BACKEND_NAME_RE.fullmatch(backend) or not _LOCAL_RE.fullmatch(local):
        return None
    return ObjectId(backend, local)


def parse_or_raise(raw: str, what: str = "volume ID") -> ObjectId:
    parsed = parse(raw)
    if parsed is None:
        raise InvalidArgument(f"{what} {raw!r} is malformed: expected '<backend>:<id>'")
    return parsed


def local_id_for_name(name: str, prefix: str = "") -> str:
    """A deterministic local ID for a request name: readable slug plus a hash for uniqueness.

    Retries of CreateVolume carry the same name, so they land on the same ID without any state.
    At most 57 characters, so that `<63-character backend>:<local>` plus a group-member suffix
    stays within the spec's 128 bytes.
    """
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    slug = _SLUG_UNSAFE.sub("-", name.lower()).strip("-")[:40].rstrip("-")
    return f"{prefix}{slug}-{digest}" if slug else f"{prefix}{digest}"
