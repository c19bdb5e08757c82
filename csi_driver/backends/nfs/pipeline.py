"""Small files copied many at a time over one pair of connections, with libnfs's async calls.

A small file costs about fifteen round trips however it is copied. Made one call at a time (the
sync API), each call is also a send, two polls and two receives, and on a VM or a UML guest,
where a system call costs tens of microseconds, those system calls are most of the copy. Here
`depth` files are in flight at once on each connection: a poll wakes for many replies and libnfs
reads them back to back, so the system calls per round trip fall to about three.

Each file is a chain of callbacks: open the source and create the copy (both at once), read,
write the pieces that are not zeros, truncate if the tail was zeros, set owner, mode and times
in one raw SETATTR (libnfs's own calls take three round trips and a path lookup), and close (its
COMMIT makes the data durable): about ten round trips. A set-id file gets its owner first, in a
SETATTR of its own, since a chown clears set-id bits and a server may apply a SETATTR's owner
after its mode. The connections must not be used by anything else meanwhile: a sync call would
run the event loop, and our callbacks with it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import select
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .libnfs import (
    SET_TO_CLIENT_TIME,
    Callback,
    Connection,
    NfsError,
    RpcCallback,
    Setattr3Args,
    Stat,
    lib,
)

_PIECE = 64 << 10
_ZEROS = bytes(_PIECE)
_POLL_MS = 100  # nfs_service must run this often for libnfs to time calls out
# nfsstat3 codes that are not Linux's errno numbers (the others are: PERM, NOENT, IO, ACCES...)
_NFS3_ERRNO = {1: errno.EPERM, 2: errno.ENOENT, 5: errno.EIO, 13: errno.EACCES,
               22: errno.EINVAL, 27: errno.EFBIG, 28: errno.ENOSPC, 30: errno.EROFS,
               69: errno.EDQUOT, 70: errno.ESTALE, 10001: errno.EBADF}

@dataclass
class _File:
    rel: bytes
    st: Stat
    fin: int = 0
    fout: int = 0
    data: bytes | None = None
    writes: int = 0  # pwrites in flight
    tail: bool = False  # the last byte was written: no truncate
    vanished: bool = False  # gone from the source since the walk: dropped from the copy
    keep: list[Any] = field(default_factory=list)  # buffers libnfs reads until its callback


class Pipeline:
    """Copy small regular files from `src` (mounted at the source) to `dst` (at the copy)."""

    def __init__(self, src: Connection, dst: Connection, depth: int,
                 tally: Callable[[int, int], None], cancelled: Callable[[], bool]) -> None:
        """`tally(files, bytes)` counts progress; `cancelled()` stops it between files."""
        self.src, self.dst, self.depth = src, dst, depth
        self.tally, self.cancelled = tally, cancelled
        self.calls: dict[int, tuple[_File, Callable[[_File, int, int], None],
                                    Callable[[_File, int], bool] | None]] = {}
        self.next_id = 1
        self.failure: BaseException | None = None
        self.in_flight = 0
        # Files that vanished from the source after the walk (a live volume's temporary
        # files): their empty copies, for the caller to unlink once the pipeline has stopped.
        self.vanished: list[str] = []
        # One C callback for every call; private_data says which call answered.
        self._cb = Callback(self._answer)
        self._rpc_cb = RpcCallback(self._rpc_answer)
        assert lib is not None
        self.rpc = lib.nfs_get_rpc_context(dst.ctx)

    def run(self, files: Iterator[tuple[str, Stat]]) -> None:
        poller = select.poll()
        fds = {self.src.fd(): self.src, self.dst.fd(): self.dst}
        while True:
            while (self.failure is None and self.in_flight < self.depth
                   and not self.cancelled()):
                item = next(files, None)
                if item is None:
                    break
                self.in_flight += 1
                self._start(_File(os.fsencode(item[0]), item[1]))
            if self.in_flight == 0:
                break
            for fd, conn in fds.items():
                poller.register(fd, conn.which_events())
            ready = dict(poller.poll(_POLL_MS))
            for fd, conn in fds.items():
                poller.unregister(fd)
                if conn.service(ready.get(fd, 0)) < 0:
                    raise NfsError(5, f"NFS connection failed: {conn.error()}")
        if self.failure is not None:
            raise self.failure
        if self.cancelled():
            from .tree import Cancelled  # a cycle at import time otherwise
            raise Cancelled

    # -- plumbing ------------------------------------------------------------------------
    def _call(self, f: _File, then: Callable[[_File, int, int], None], what: str,
              issue: Callable[[int], int],
              on_error: Callable[[_File, int], bool] | None = None) -> None:
        """Send a call; `then` takes its answer, `on_error(file, errno)` may take a failure
        (True: handled)."""
        key = self.next_id
        self.next_id += 1
        self.calls[key] = (f, then, on_error)
        if issue(key) != 0:
            del self.calls[key]
            self._fail(f, NfsError(5, f"{what} {os.fsdecode(f.rel)}: could not be sent"))

    def _answer(self, err: int, _nfs: int | None, data: int | None, key: int | None) -> None:
        f, then, on_error = self.calls.pop(key or 0)
        if not f.rel:
            return  # the file failed already: the rest of its answers change nothing
        try:
            if err < 0 and on_error is not None and on_error(f, -err):
                return
            if err < 0:
                msg = ctypes.string_at(data).decode(errors="replace") if data else ""
                raise NfsError(-err, f"{os.fsdecode(f.rel)}: {msg or os.strerror(-err)}")
            then(f, err, data or 0)
        except BaseException as exc:  # carried to run(), never into C
            self._fail(f, exc)

    def _fail(self, f: _File, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        self._finish(f)

    def _finish(self, f: _File) -> None:
        if f.rel:  # once per file, however many of its calls fail
            f.rel = b""
            self.in_flight -= 1

    # -- one file ------------------------------------------------------------------------
    def _start(self, f: _File) -> None:
        assert lib is not None
        sc, dc = self.src.ctx, self.dst.ctx
        self._call(f, self._opened, "open", lambda k: lib.nfs_open2_async(
            sc, f.rel, os.O_RDONLY | os.O_NOFOLLOW, 0, self._cb, k), self._open_failed)
        self._call(f, self._created, "create", lambda k: lib.nfs_create_async(
            dc, f.rel, os.O_WRONLY | os.O_EXCL, 0o600, self._cb, k), self._create_failed)

    def _open_failed(self, f: _File, err: int) -> bool:
        if err != errno.ENOENT:
            return False
        f.vanished = True  # deleted since the walk: tar and cp skip it too
        if f.fout:
            self._drop(f)
        return True

    def _create_failed(self, f: _File, err: int) -> bool:
        """EEXIST: libnfs resent our exclusive CREATE after a reconnect and the server had
        done the first one. Nobody else writes in a copy in progress: the file is ours."""
        if err != errno.EEXIST:
            return False
        assert lib is not None
        self._call(f, self._created, "reopen", lambda k: lib.nfs_open2_async(
            self.dst.ctx, f.rel, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW, 0, self._cb, k))
        return True

    def _drop(self, f: _File) -> None:
        assert lib is not None
        fh, f.fout = f.fout, 0
        self._call(f, self._dropped, "close", lambda k: lib.nfs_close_async(
            self.dst.ctx, fh, self._cb, k))

    def _dropped(self, f: _File, _n: int, _data: int) -> None:
        self.vanished.append(os.fsdecode(f.rel))
        self._finish(f)

    def _opened(self, f: _File, _n: int, fh: int) -> None:
        f.fin = fh
        f.keep.append(b"")
        self._read_more(f)

    def _read_more(self, f: _File) -> None:
        assert lib is not None
        at = len(f.keep[0])
        self._call(f, self._read, "read", lambda k: lib.nfs_pread_async(
            self.src.ctx, f.fin, at, max(f.st.size - at, 1), self._cb, k))

    def _read(self, f: _File, n: int, buf: int) -> None:
        assert lib is not None
        if n > 0:
            f.keep[0] += ctypes.string_at(buf, min(n, f.st.size - len(f.keep[0])))
            self.tally(0, n)
            if len(f.keep[0]) < f.st.size:  # a server whose reads are shorter than the file
                self._read_more(f)
                return
        f.data = f.keep.pop()
        if len(f.data) < f.st.size:  # n == 0 before the end: it shrank; copy what there is
            f.st = dataclasses.replace(f.st, size=len(f.data))
        # A read-only handle closes without a round trip.
        lib.nfs_close(self.src.ctx, f.fin)
        f.fin = 0
        self._write(f)

    def _created(self, f: _File, _n: int, fh: int) -> None:
        f.fout = fh
        if f.vanished:
            self._drop(f)
            return
        self._write(f)

    def _write(self, f: _File) -> None:
        if f.data is None or not f.fout or not f.rel:
            return  # the other half of the first step has not answered yet (or failed)
        assert lib is not None
        data = f.data
        f.tail = len(data) == 0
        for at in range(0, len(data), _PIECE):
            piece = data[at:at + _PIECE]
            if piece == _ZEROS[:len(piece)]:
                continue  # zero pieces stay holes
            f.tail = at + len(piece) == f.st.size
            f.writes += 1
            f.keep.append(piece)
            self._call(f, self._wrote, "write", self._pwrite(f.fout, at, piece))
        if f.writes == 0:
            self._written(f)

    def _pwrite(self, fh: int, offset: int, piece: bytes) -> Callable[[int], int]:
        def issue(key: int) -> int:
            assert lib is not None
            return int(lib.nfs_pwrite_async(self.dst.ctx, fh, offset, len(piece), piece,
                                            self._cb, key))
        return issue

    def _wrote(self, f: _File, _n: int, _data: int) -> None:
        f.writes -= 1
        if f.writes == 0:
            self._written(f)

    def _written(self, f: _File) -> None:
        assert lib is not None
        f.keep.clear()
        if not f.tail:  # zero pieces at the end were not written, and the file may have shrunk
            self._call(f, self._attributes, "truncate", lambda k: lib.nfs_ftruncate_async(
                self.dst.ctx, f.fout, f.st.size, self._cb, k))
        else:
            self._attributes(f, 0, 0)

    def _attributes(self, f: _File, _n: int, _data: int) -> None:
        st = f.st
        if st.mode & (stat.S_ISUID | stat.S_ISGID):
            self._setattr(f, self._mode_and_times, owner=True)
        else:
            self._setattr(f, self._close, owner=True, mode=True, times=True)

    def _mode_and_times(self, f: _File, _n: int, _data: int) -> None:
        self._setattr(f, self._close, mode=True, times=True)

    def _setattr(self, f: _File, then: Callable[[_File, int, int], None], owner: bool = False,
                 mode: bool = False, times: bool = False) -> None:
        assert lib is not None
        st, handle = f.st, lib.nfs_get_fh(f.fout).contents
        args = Setattr3Args(fh_len=handle.len, fh_val=handle.val)
        if owner:
            args.uid.set_it = args.gid.set_it = 1
            args.uid.value, args.gid.value = st.uid, st.gid
        if mode:
            args.mode.set_it, args.mode.value = 1, stat.S_IMODE(st.mode)
        if times:
            for t, ns in ((args.atime, st.atime_ns), (args.mtime, st.mtime_ns)):
                t.set_it, t.seconds, t.nseconds = SET_TO_CLIENT_TIME, ns // 10**9, ns % 10**9
        f.keep.append(args)  # libnfs encodes it at once, but keep it until the answer anyway
        self._call(f, then, "setattr", lambda k: lib.rpc_nfs3_setattr_async(
            self.rpc, self._rpc_cb, ctypes.byref(args), k))

    def _rpc_answer(self, _rpc: int | None, status: int, data: int | None,
                    key: int | None) -> None:
        # An RPC-level answer: status 0 and then the NFS status, the first field of the result.
        nfs_status = ctypes.c_int32.from_address(data).value if status == 0 and data else -1
        err = 0 if nfs_status == 0 else -_NFS3_ERRNO.get(nfs_status, errno.EIO)
        self._answer(err, None, None, key)

    def _close(self, f: _File, _n: int, _data: int) -> None:
        assert lib is not None
        fh, f.fout = f.fout, 0
        self._call(f, self._done, "close", lambda k: lib.nfs_close_async(
            self.dst.ctx, fh, self._cb, k))

    def _done(self, f: _File, _n: int, _data: int) -> None:
        self._finish(f)
        self.tally(1, 0)
