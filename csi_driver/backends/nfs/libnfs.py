"""A userspace NFS client: libnfs (Debian libnfs13) through ctypes.

The controller creates, renames, copies and removes directories on the share without a kernel
mount, so it needs no privilege, no mount helper and no NFS kernel module. ctypes releases the GIL
for the length of each libnfs call, so a slow server or a long copy stalls only its own thread;
PyPI's SWIG binding holds the GIL and hides mount errors, which is why it is not used.

A Connection is one libnfs context (one TCP connection, not thread-safe): a thread borrows one
from a Pool for a whole operation. Calls return -errno; they raise NfsError carrying errno and
libnfs's own message (the server's answer, e.g. "MNT3ERR_ACCES").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import math
import os
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

_c_p = ctypes.c_void_p
_str = ctypes.c_char_p
_u64 = ctypes.c_uint64


class _Stat64(ctypes.Structure):
    _fields_ = [(n, _u64) for n in (
        "dev", "ino", "mode", "nlink", "uid", "gid", "rdev", "size", "blksize", "blocks",
        "atime", "mtime", "ctime", "atime_nsec", "mtime_nsec", "ctime_nsec", "used")]


class _Statvfs64(ctypes.Structure):
    _fields_ = [(n, _u64) for n in (
        "bsize", "frsize", "blocks", "bfree", "bavail", "files", "ffree", "favail", "fsid",
        "flag", "namemax")]


class _Dirent(ctypes.Structure):
    # Only the leading fields, which every libnfs since 1.x lays out the same way.
    pass


class _Timeval(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("usec", ctypes.c_long)]


_u32 = ctypes.c_uint32
# libnfs 4.0's struct nfsdirent: READDIRPLUS fills every attribute, so a walk needs no GETATTR.
_Dirent._fields_ = [("next", ctypes.POINTER(_Dirent)), ("name", _str), ("inode", _u64),
                    ("type", _u32), ("mode", _u32), ("size", _u64), ("atime", _Timeval),
                    ("mtime", _Timeval), ("ctime", _Timeval), ("uid", _u32), ("gid", _u32),
                    ("nlink", _u32), ("dev", _u64), ("rdev", _u64), ("blksize", _u64),
                    ("blocks", _u64), ("used", _u64), ("atime_nsec", _u32),
                    ("mtime_nsec", _u32), ("ctime_nsec", _u32)]


# void (*nfs_cb)(int err, struct nfs_context *nfs, void *data, void *private_data)
Callback = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_void_p)


# void (*rpc_cb)(struct rpc_context *rpc, int status, void *data, void *private_data)
RpcCallback = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                               ctypes.c_void_p)


class NfsFh(ctypes.Structure):
    """struct nfs_fh: a file handle, as nfs_get_fh returns it."""
    _fields_ = [("len", ctypes.c_int), ("val", ctypes.c_void_p)]


class _Set32(ctypes.Structure):  # set_mode3, set_uid3, set_gid3
    _fields_ = [("set_it", ctypes.c_uint32), ("value", ctypes.c_uint32)]


class _Set64(ctypes.Structure):  # set_size3
    _fields_ = [("set_it", ctypes.c_uint32), ("value", ctypes.c_uint64)]


class _SetTime(ctypes.Structure):  # set_atime, set_mtime: time_how, then nfstime3
    _fields_ = [("set_it", ctypes.c_int), ("seconds", ctypes.c_uint32),
                ("nseconds", ctypes.c_uint32)]


class Setattr3Args(ctypes.Structure):
    """SETATTR3args from libnfs-raw-nfs.h: one SETATTR sets owner, mode and times at once,
    where the high-level calls take one round trip each (and a lookup of the path for times)."""
    _fields_ = [("fh_len", ctypes.c_uint), ("fh_val", ctypes.c_void_p),
                ("mode", _Set32), ("uid", _Set32), ("gid", _Set32), ("size", _Set64),
                ("atime", _SetTime), ("mtime", _SetTime),
                ("guard_check", ctypes.c_uint32), ("guard_seconds", ctypes.c_uint32),
                ("guard_nseconds", ctypes.c_uint32)]


SET_TO_CLIENT_TIME = 2


def _load() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("nfs") or "libnfs.so.13"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    sigs: dict[str, tuple[list[type], type | None]] = {
        "nfs_init_context": ([], _c_p),
        "nfs_destroy_context": ([_c_p], None),
        "nfs_get_error": ([_c_p], _str),
        "nfs_set_version": ([_c_p, ctypes.c_int], ctypes.c_int),
        "nfs_set_timeout": ([_c_p, ctypes.c_int], None),
        "nfs_set_autoreconnect": ([_c_p, ctypes.c_int], None),
        "nfs_set_tcp_syncnt": ([_c_p, ctypes.c_int], None),
        "nfs_mount": ([_c_p, _str, _str], ctypes.c_int),
        "nfs_stat64": ([_c_p, _str, ctypes.POINTER(_Stat64)], ctypes.c_int),
        "nfs_lstat64": ([_c_p, _str, ctypes.POINTER(_Stat64)], ctypes.c_int),
        "nfs_fstat64": ([_c_p, _c_p, ctypes.POINTER(_Stat64)], ctypes.c_int),
        "nfs_statvfs64": ([_c_p, _str, ctypes.POINTER(_Statvfs64)], ctypes.c_int),
        "nfs_mkdir2": ([_c_p, _str, ctypes.c_int], ctypes.c_int),
        "nfs_rmdir": ([_c_p, _str], ctypes.c_int),
        "nfs_unlink": ([_c_p, _str], ctypes.c_int),
        "nfs_rename": ([_c_p, _str, _str], ctypes.c_int),
        "nfs_chmod": ([_c_p, _str, ctypes.c_int], ctypes.c_int),
        "nfs_lchown": ([_c_p, _str, ctypes.c_int, ctypes.c_int], ctypes.c_int),
        "nfs_lutimes": ([_c_p, _str, ctypes.POINTER(_Timeval)], ctypes.c_int),
        "nfs_symlink": ([_c_p, _str, _str], ctypes.c_int),
        "nfs_readlink": ([_c_p, _str, ctypes.c_char_p, ctypes.c_int], ctypes.c_int),
        "nfs_link": ([_c_p, _str, _str], ctypes.c_int),
        "nfs_opendir": ([_c_p, _str, ctypes.POINTER(_c_p)], ctypes.c_int),
        "nfs_readdir": ([_c_p, _c_p], ctypes.POINTER(_Dirent)),
        "nfs_closedir": ([_c_p, _c_p], None),
        "nfs_open2": ([_c_p, _str, ctypes.c_int, ctypes.c_int, ctypes.POINTER(_c_p)],
                      ctypes.c_int),
        "nfs_close": ([_c_p, _c_p], ctypes.c_int),
        "nfs_pread": ([_c_p, _c_p, _u64, _u64, _c_p], ctypes.c_int),
        "nfs_pwrite": ([_c_p, _c_p, _u64, _u64, _c_p], ctypes.c_int),
        "nfs_ftruncate": ([_c_p, _c_p, _u64], ctypes.c_int),
        "nfs_fchmod": ([_c_p, _c_p, ctypes.c_int], ctypes.c_int),
        "nfs_fchown": ([_c_p, _c_p, ctypes.c_int, ctypes.c_int], ctypes.c_int),
        # The event loop and the async calls (pipeline.py).
        "nfs_get_fd": ([_c_p], ctypes.c_int),
        "nfs_which_events": ([_c_p], ctypes.c_int),
        "nfs_service": ([_c_p, ctypes.c_int], ctypes.c_int),
        "nfs_open2_async": ([_c_p, _str, ctypes.c_int, ctypes.c_int, Callback, _c_p],
                            ctypes.c_int),
        "nfs_create_async": ([_c_p, _str, ctypes.c_int, ctypes.c_int, Callback, _c_p],
                             ctypes.c_int),
        "nfs_pread_async": ([_c_p, _c_p, _u64, _u64, Callback, _c_p], ctypes.c_int),
        "nfs_pwrite_async": ([_c_p, _c_p, _u64, _u64, _c_p, Callback, _c_p], ctypes.c_int),
        "nfs_ftruncate_async": ([_c_p, _c_p, _u64, Callback, _c_p], ctypes.c_int),
        "nfs_fchown_async": ([_c_p, _c_p, ctypes.c_int, ctypes.c_int, Callback, _c_p],
                             ctypes.c_int),
        "nfs_fchmod_async": ([_c_p, _c_p, ctypes.c_int, Callback, _c_p], ctypes.c_int),
        "nfs_close_async": ([_c_p, _c_p, Callback, _c_p], ctypes.c_int),
        "nfs_lutimes_async": ([_c_p, _str, ctypes.POINTER(_Timeval), Callback, _c_p],
                              ctypes.c_int),
        "nfs_get_rpc_context": ([_c_p], _c_p),
        "nfs_get_fh": ([_c_p], ctypes.POINTER(NfsFh)),
        "rpc_nfs3_setattr_async": ([_c_p, RpcCallback, ctypes.POINTER(Setattr3Args), _c_p],
                                   ctypes.c_int),
        "nfs_get_readmax": ([_c_p], _u64),
        "nfs_get_writemax": ([_c_p], _u64),
    }
    for fn, (args, res) in sigs.items():
        f = getattr(lib, fn)
        f.argtypes, f.restype = args, res
    return lib


_lib = _load()
lib = _lib  # for pipeline.py, which drives the async calls itself
Timeval = _Timeval


class NfsError(OSError):
    """A failed libnfs call: errno plus libnfs's message."""


@dataclass(frozen=True, slots=True)
class Stat:
    mode: int
    uid: int
    gid: int
    size: int
    nlink: int
    ino: int
    atime_ns: int
    mtime_ns: int
    blocks: int  # 512-byte units actually allocated


def _b(path: str) -> bytes:
    return os.fsencode(path)


class Connection:
    """One mounted export. Paths are absolute within the export ("/" is its root)."""

    def __init__(self, server: str, export: str, version: int = 3, timeout: float = 10.0) -> None:
        if _lib is None:
            raise NfsError(errno.ENOSYS, "libnfs is not installed (Debian package libnfs13)")
        self.server, self.export = server, export
        ctx = _lib.nfs_init_context()
        if not ctx:
            raise NfsError(errno.ENOMEM, "nfs_init_context failed")
        self._ctx: int | None = ctx
        # Every synchronous call gives up after `timeout`; one reconnect attempt, not forever.
        _lib.nfs_set_timeout(ctx, int(timeout * 1000))
        _lib.nfs_set_autoreconnect(ctx, 1)
        # The timeout does not cover connecting: bound the SYN retries instead (n retries wait
        # 2^(n+1)-1 s in all), or a server that drops packets holds a caller for two minutes.
        _lib.nfs_set_tcp_syncnt(ctx, max(1, int(math.log2(timeout + 1)) - 1))
        try:
            self._check(_lib.nfs_set_version(ctx, version), f"NFS version {version}")
            self._check(_lib.nfs_mount(ctx, server.encode(), export.encode()),
                        f"mount of {server}:{export}")
        except NfsError:
            self.close()  # its socket and memory, or every failed RPC would leak one
            raise
        self.readmax = min(int(_lib.nfs_get_readmax(ctx)), int(_lib.nfs_get_writemax(ctx)),
                           1 << 20) or 1 << 20

    def close(self) -> None:
        if self._ctx is not None and _lib is not None:
            _lib.nfs_destroy_context(self._ctx)
            self._ctx = None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The event loop, for async calls (pipeline.py).
    def fd(self) -> int:
        assert _lib is not None
        return int(_lib.nfs_get_fd(self.ctx))

    def which_events(self) -> int:
        assert _lib is not None
        return int(_lib.nfs_which_events(self.ctx))

    def service(self, revents: int) -> int:
        assert _lib is not None
        return int(_lib.nfs_service(self.ctx, revents))

    def error(self) -> str:
        assert _lib is not None
        return (_lib.nfs_get_error(self.ctx) or b"").decode(errors="replace")

    @property
    def ctx(self) -> int:
        if self._ctx is None:
            raise NfsError(errno.EBADF, "connection is closed")
        return self._ctx

    def _check(self, rc: int, what: str) -> int:
        if rc < 0:
            assert _lib is not None
            msg = (_lib.nfs_get_error(self._ctx) or b"").decode(errors="replace")
            code = -rc
            raise NfsError(code, f"{what}: {msg or os.strerror(code)}")
        return rc

    # -- metadata -----------------------------------------------------------------------
    def _stat(self, fn: str, path: str) -> Stat:
        st = _Stat64()
        assert _lib is not None
        self._check(getattr(_lib, fn)(self.ctx, _b(path), ctypes.byref(st)), f"stat {path}")
        return self._convert(st)

    def fstat(self, fh: int) -> Stat:
        st = _Stat64()
        assert _lib is not None
        self._check(_lib.nfs_fstat64(self.ctx, fh, ctypes.byref(st)), "fstat")
        return self._convert(st)

    @staticmethod
    def _convert(st: _Stat64) -> Stat:
        return Stat(mode=st.mode, uid=st.uid, gid=st.gid, size=st.size, nlink=st.nlink,
                    ino=st.ino, atime_ns=st.atime * 10**9 + st.atime_nsec,
                    mtime_ns=st.mtime * 10**9 + st.mtime_nsec, blocks=st.blocks)

    def stat(self, path: str) -> Stat:
        return self._stat("nfs_stat64", path)

    def lstat(self, path: str) -> Stat:
        return self._stat("nfs_lstat64", path)

    def exists(self, path: str) -> bool:
        try:
            self.lstat(path)
        except NfsError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def available(self, path: str = "/") -> int:
        """Bytes an unprivileged user can still write on the export (statvfs f_bavail)."""
        st = _Statvfs64()
        assert _lib is not None
        self._check(_lib.nfs_statvfs64(self.ctx, _b(path), ctypes.byref(st)), "statvfs")
        return int(st.bavail * (st.frsize or st.bsize))

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        assert _lib is not None
        self._check(_lib.nfs_mkdir2(self.ctx, _b(path), mode), f"mkdir {path}")

    def makedirs(self, path: str, mode: int = 0o755) -> None:
        """mkdir -p (existing directories are fine)."""
        parts = [p for p in path.split("/") if p]
        for i in range(1, len(parts) + 1):
            sub = "/" + "/".join(parts[:i])
            try:
                self.mkdir(sub, mode)
            except NfsError as exc:
                if exc.errno != errno.EEXIST:
                    raise

    def rmdir(self, path: str) -> None:
        assert _lib is not None
        self._check(_lib.nfs_rmdir(self.ctx, _b(path)), f"rmdir {path}")

    def unlink(self, path: str) -> None:
        assert _lib is not None
        self._check(_lib.nfs_unlink(self.ctx, _b(path)), f"unlink {path}")

    def rename(self, old: str, new: str) -> None:
        assert _lib is not None
        self._check(_lib.nfs_rename(self.ctx, _b(old), _b(new)), f"rename {old} -> {new}")

    def chmod(self, path: str, mode: int) -> None:
        assert _lib is not None
        self._check(_lib.nfs_chmod(self.ctx, _b(path), mode), f"chmod {path}")

    def lchown(self, path: str, uid: int, gid: int) -> None:
        assert _lib is not None
        self._check(_lib.nfs_lchown(self.ctx, _b(path), uid, gid), f"chown {path}")

    def lutimes(self, path: str, atime_ns: int, mtime_ns: int) -> None:
        tv = (_Timeval * 2)(_Timeval(atime_ns // 10**9, atime_ns % 10**9 // 1000),
                            _Timeval(mtime_ns // 10**9, mtime_ns % 10**9 // 1000))
        assert _lib is not None
        self._check(_lib.nfs_lutimes(self.ctx, _b(path), tv), f"utimes {path}")

    def symlink(self, target: str, path: str) -> None:
        assert _lib is not None
        self._check(_lib.nfs_symlink(self.ctx, _b(target), _b(path)), f"symlink {path}")

    def readlink(self, path: str) -> str:
        buf = ctypes.create_string_buffer(4097)
        assert _lib is not None
        self._check(_lib.nfs_readlink(self.ctx, _b(path), buf, 4096), f"readlink {path}")
        return os.fsdecode(buf.value)

    def link(self, old: str, new: str) -> None:
        assert _lib is not None
        self._check(_lib.nfs_link(self.ctx, _b(old), _b(new)), f"link {new}")

    def listdir(self, path: str) -> list[tuple[str, int]]:
        """(name, st_mode) of each entry but . and .."""
        return [(name, st.mode) for name, st in self.scandir(path)]

    def scandir(self, path: str) -> list[tuple[str, Stat]]:
        """(name, lstat) of each entry but . and .., from READDIRPLUS: no round trip per entry."""
        assert _lib is not None
        handle = _c_p()
        self._check(_lib.nfs_opendir(self.ctx, _b(path), ctypes.byref(handle)), f"list {path}")
        out = []
        try:
            while True:
                ent = _lib.nfs_readdir(self.ctx, handle)
                if not ent:
                    break
                e = ent.contents
                name = os.fsdecode(e.name or b"")
                if name not in (".", ".."):
                    out.append((name, Stat(
                        mode=e.mode, uid=e.uid, gid=e.gid, size=e.size, nlink=e.nlink,
                        ino=e.inode, atime_ns=e.atime.sec * 10**9 + e.atime_nsec,
                        mtime_ns=e.mtime.sec * 10**9 + e.mtime_nsec, blocks=e.blocks)))
        finally:
            _lib.nfs_closedir(self.ctx, handle)
        return out

    # -- file contents ------------------------------------------------------------------
    @contextmanager
    def open(self, path: str, flags: int, mode: int = 0o644) -> Iterator[int]:
        assert _lib is not None
        fh = _c_p()
        self._check(_lib.nfs_open2(self.ctx, _b(path), flags, mode, ctypes.byref(fh)),
                    f"open {path}")
        try:
            yield fh.value or 0
        finally:
            _lib.nfs_close(self.ctx, fh)

    def pread(self, fh: int, offset: int, buf: ctypes.Array[ctypes.c_char]) -> int:
        assert _lib is not None
        return self._check(_lib.nfs_pread(self.ctx, fh, offset, len(buf), buf), "read")

    def pwrite(self, fh: int, offset: int, data: bytes | memoryview) -> None:
        assert _lib is not None
        view = memoryview(data)
        done = 0
        while done < len(view):
            chunk = bytes(view[done:])
            n = self._check(_lib.nfs_pwrite(self.ctx, fh, offset + done, len(chunk), chunk),
                            "write")
            if n == 0:
                raise NfsError(errno.EIO, "write made no progress")
            done += n

    def ftruncate(self, fh: int, size: int) -> None:
        assert _lib is not None
        self._check(_lib.nfs_ftruncate(self.ctx, fh, size), "truncate")

    # On an open file: one SETATTR, where the path calls look up every component first.
    def fchmod(self, fh: int, mode: int) -> None:
        assert _lib is not None
        self._check(_lib.nfs_fchmod(self.ctx, fh, mode), "chmod")

    def fchown(self, fh: int, uid: int, gid: int) -> None:
        assert _lib is not None
        self._check(_lib.nfs_fchown(self.ctx, fh, uid, gid), "chown")

    def read_file(self, path: str) -> bytes:
        chunks = []
        buf = ctypes.create_string_buffer(self.readmax)
        with self.open(path, os.O_RDONLY) as fh:
            offset = 0
            while True:
                n = self.pread(fh, offset, buf)
                if n <= 0:
                    break
                chunks.append(buf.raw[:n])
                offset += n
        return b"".join(chunks)

    def write_file(self, path: str, data: bytes, mode: int = 0o600) -> None:
        with self.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode) as fh:
            self.pwrite(fh, 0, data)


class Pool:
    """Idle connections to one export, reused across RPCs (a mount costs ~2 ms)."""

    def __init__(self, server: str, export: str, version: int, timeout: float,
                 keep: int = 32) -> None:
        self.server, self.export, self.version, self.timeout = server, export, version, timeout
        self._idle: queue.LifoQueue[Connection] = queue.LifoQueue(maxsize=keep)
        self._lock = threading.Lock()

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            # One connect at a time: a burst of them overflows the server's accept queue, and
            # each dropped SYN costs its caller a whole second.
            with self._lock:
                conn = Connection(self.server, self.export, self.version, self.timeout)
        healthy = False
        try:
            yield conn
            healthy = True
        except NfsError as exc:
            # A call that failed at the filesystem level leaves the connection usable.
            healthy = exc.errno in _FS_ERRORS
            raise
        finally:
            if healthy:
                try:
                    self._idle.put_nowait(conn)
                except queue.Full:
                    conn.close()
            else:
                conn.close()

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


_FS_ERRORS = frozenset({errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR,
                        errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT,
                        errno.EINVAL, errno.ENAMETOOLONG, errno.EXDEV, errno.EROFS})
