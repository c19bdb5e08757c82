"""Connections to one backend's export, with libnfs failures turned into CSI errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ... import errors
from . import failures
from .config import NfsConfig
from .libnfs import Connection, NfsError, Pool


class Access:
    def __init__(self, config: NfsConfig) -> None:
        self.config = config
        self.pool = Pool(config.server, config.share, config.controllerVersion,
                         config.timeoutSeconds)

    def csi_error(self, exc: NfsError) -> errors.CsiError:
        c = self.config
        if (exc.strerror or "").startswith("mount of"):
            return failures.mount_to_csi(exc, c.server, c.share, c.controllerVersion,
                                         c.timeoutSeconds)
        return failures.to_csi(exc, c.server, c.share)

    @contextmanager
    def conn(self) -> Iterator[Connection]:
        """A pooled connection; a libnfs failure inside the block leaves it as a CSI error."""
        try:
            with self.pool.connection() as conn:
                yield conn
        except NfsError as exc:
            raise self.csi_error(exc) from exc

    def connect(self, under: str = "/") -> Connection:
        """A connection of its own, for long work that should not hold a pooled one, with the
        share's directory `under` as its root."""
        c = self.config
        export = c.share.rstrip("/") + under if under != "/" else c.share
        return Connection(c.server, export, c.controllerVersion, c.timeoutSeconds)
