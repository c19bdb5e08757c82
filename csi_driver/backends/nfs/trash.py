"""The trash: a deleted volume or snapshot is one rename into it; a thread empties it. Also
what the other onDelete policies do with a deleted volume's directory."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time

from . import share
from .access import Access
from .copies import Copies
from .libnfs import Connection, NfsError
from .tree import remove_tree

log = logging.getLogger(__name__)


class Trash:
    def __init__(self, name: str, access: Access, copies: Copies) -> None:
        self.name = name
        self.access = access
        self.copies = copies
        self._wake = threading.Event()
        self.waiting = 0  # entries the last round found in the trash (for metrics)

    def start(self, conn: Connection) -> None:
        """In the controller only (one, by leader election): at its start whatever a killed
        one left in tmp is garbage; then the purger runs for good."""
        for name, _ in conn.listdir(share.TMP):
            share.to_trash(conn, f"{share.TMP}/{name}")
        threading.Thread(target=self._purge, name=f"purge {self.name}", daemon=True).start()

    def wake(self) -> None:
        self._wake.set()

    def dispose(self, conn: Connection, path: str, on_delete: str) -> None:
        """A deleted volume's directory, by its onDelete policy: into the trash (delete),
        renamed to archived-<name>-<UTC time> beside itself (archive), or left (retain)."""
        if on_delete == "delete":
            share.to_trash(conn, path)
            self.wake()
        elif on_delete == "archive":
            stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
            archived = f"{os.path.dirname(path).rstrip('/')}/archived-" \
                       f"{os.path.basename(path)}-{stamp}"
            try:
                conn.rename(path, archived)
            except NfsError as exc:
                if exc.errno != errno.ENOENT:
                    raise

    def _purge(self) -> None:
        """Empty the trash in the background: a delete of a million files is one rename.
        Abandoned copies go first, so their trash goes in the same round."""
        conn: Connection | None = None
        while True:
            try:
                conn = conn or self.access.connect()
                self.copies.sweep(conn)
                entries = conn.listdir(share.TRASH)
                self.waiting = len(entries)
                for name, _ in entries:
                    remove_tree(conn, f"{share.TRASH}/{name}")
                    self.waiting -= 1
            except NfsError:
                if conn is not None:  # the server is away: reconnect next round
                    conn.close()
                    conn = None
            except Exception:  # the purger must outlive any one bad directory
                log.exception("backend %s: purging the trash failed; retrying later", self.name)
            # Often enough that an abandoned copy goes within half its age again.
            self._wake.wait(min(300.0, self.access.config.abandonAfterSeconds / 2))
            self._wake.clear()
