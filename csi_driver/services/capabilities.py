"""VolumeCapability messages <-> backend Capability, and the checks shared by several RPCs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..backends.base import AccessMode, Backend, Capability
from ..csi import csi_pb2 as pb
from ..errors import InvalidArgument


def from_pb(cap: pb.VolumeCapability) -> Capability:
    if not cap.HasField("access_mode") or cap.access_mode.mode == 0:
        raise InvalidArgument("volume capability needs an access_mode")
    try:
        mode = AccessMode(cap.access_mode.mode)
    except ValueError:
        raise InvalidArgument(f"unknown access mode {cap.access_mode.mode}") from None
    kind = cap.WhichOneof("access_type")
    if kind is None:
        raise InvalidArgument("volume capability needs an access_type: mount or block")
    if kind == "block":
        return Capability(block=True, access_mode=mode)
    return Capability(
        block=False,
        access_mode=mode,
        fs_type=cap.mount.fs_type,
        mount_flags=tuple(cap.mount.mount_flags),
    )


def parse_all(caps: Iterable[pb.VolumeCapability]) -> list[Capability]:
    parsed = [from_pb(c) for c in caps]
    if not parsed:
        raise InvalidArgument("volume_capabilities must not be empty")
    return parsed


def unsupported(backend: Backend[Any], cap: Capability,
                parameters: Mapping[str, str] | None = None) -> str | None:
    """Why `backend` cannot serve `cap` (for a volume made with `parameters`, when given), or
    None when it can."""
    features = backend.features
    if cap.block and not features.block:
        return f"backend {backend.name!r} ({backend.type_name}) does not offer raw block volumes"
    if cap.access_mode not in features.access_modes:
        return (
            f"backend {backend.name!r} ({backend.type_name}) does not support access mode "
            f"{cap.access_mode.name}"
        )
    if parameters is not None:
        return backend.capability_problem(cap, parameters)
    return None


def require_supported(backend: Backend[Any], caps: Iterable[Capability],
                      parameters: Mapping[str, str]) -> None:
    for cap in caps:
        reason = unsupported(backend, cap, parameters)
        if reason:
            raise InvalidArgument(reason)
