"""NFS failures as gRPC errors that carry the server's own words."""

from __future__ import annotations

import errno

from ... import errors
from .libnfs import Connection, NfsError

# libnfs reports a call that timed out as EINTR ("Command timed out").
_UNREACHABLE = frozenset({errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                          errno.ENETUNREACH, errno.ECONNRESET, errno.EPIPE, errno.EIO,
                          errno.EINTR})


def to_csi(exc: NfsError, server: str, export: str) -> errors.CsiError:
    """The gRPC error for a libnfs failure."""
    where = f"{server}:{export}"
    text = exc.strerror or str(exc)
    code = exc.errno or 0
    if "resolv" in text or "Invalid address" in text:
        return errors.InvalidArgument(f"NFS server {server!r} does not resolve: {text}")
    if code in _UNREACHABLE or "connect" in text.lower():
        return errors.Unavailable(f"NFS server {server} is not reachable: {text}")
    if code == errno.ENOENT and text.startswith("mount of"):
        return errors.NotFound(f"{where} is not exported: {text}")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return errors.PermissionDenied(f"{where}: {text}")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return errors.ResourceExhausted(f"{where} is full: {text}")
    return errors.Internal(f"{where}: {text}")


def mount_to_csi(exc: NfsError, server: str, export: str, version: int,
                 timeout: float) -> errors.CsiError:
    """A failed mount of the export: Ganesha and knfsd answer MNT3ERR_ACCES for an export they
    do not have, so v3's EACCES is checked against NFSv4's pseudo filesystem, which tells
    "no such export" apart from "not allowed"."""
    if exc.errno == errno.EACCES and version == 3:
        try:
            Connection(server, export, 4, timeout).close()
        except NfsError as v4:
            if v4.errno == errno.ENOENT:
                return errors.NotFound(
                    f"{server}:{export} is not exported to us (v3: {exc}; v4: {v4})")
    return to_csi(exc, server, export)
