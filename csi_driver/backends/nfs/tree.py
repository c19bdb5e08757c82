"""Whole-tree operations over one libnfs connection: copy (for snapshots, restores and clones)
and remove (for the trash purger).

The copy keeps what `cp -a` keeps on a filesystem without xattrs: modes, owners, times, symlinks,
hard links and holes. Holes are kept by not writing blocks of zeros and setting the length last,
so a sparse file stays sparse on any server that allocates lazily.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from .libnfs import Connection, NfsError

_PIECE = 64 << 10


@dataclass
class Progress:
    files: int = 0
    bytes: int = 0  # payload bytes read from the source (holes excluded)
    cancelled: Callable[[], bool] = field(default=lambda: False)


class Cancelled(Exception):
    pass


def copy_tree(conn: Connection, src: str, dst: str, progress: Progress | None = None) -> None:
    """Copy directory `src` to `dst` (which must not exist) with everything in it."""
    progress = progress or Progress()
    links: dict[int, str] = {}  # source inode -> first copy, for files with several names
    buf = ctypes.create_string_buffer(conn.readmax)
    zeros = bytes(_PIECE)
    dirs: list[tuple[str, int, int]] = []  # directories whose times are set last

    def copy_dir(s: str, d: str) -> None:
        st = conn.lstat(s)
        conn.mkdir(d, 0o700)
        for name, _mode in conn.listdir(s):
            if progress.cancelled():
                raise Cancelled
            copy_entry(f"{s}/{name}", f"{d}/{name}")
        conn.lchown(d, st.uid, st.gid)
        conn.chmod(d, stat.S_IMODE(st.mode))
        dirs.append((d, st.atime_ns, st.mtime_ns))

    def copy_entry(s: str, d: str) -> None:
        st = conn.lstat(s)
        if stat.S_ISDIR(st.mode):
            copy_dir(s, d)
            return
        if stat.S_ISREG(st.mode) and st.nlink > 1 and st.ino in links:
            conn.link(links[st.ino], d)
            return
        if stat.S_ISLNK(st.mode):
            conn.symlink(conn.readlink(s), d)
        elif stat.S_ISREG(st.mode):
            copy_file(s, d, st.size)
            conn.lchown(d, st.uid, st.gid)
            conn.chmod(d, stat.S_IMODE(st.mode))  # after chown, which may clear set-id bits
            if st.nlink > 1:
                links[st.ino] = d
        else:
            return  # sockets, fifos and devices have no place on a volume copy
        if stat.S_ISLNK(st.mode):
            conn.lchown(d, st.uid, st.gid)
        conn.lutimes(d, st.atime_ns, st.mtime_ns)
        progress.files += 1

    def copy_file(s: str, d: str, size: int) -> None:
        with conn.open(s, os.O_RDONLY) as fin, \
                conn.open(d, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600) as fout:
            offset = 0
            while offset < size:
                if progress.cancelled():
                    raise Cancelled
                n = conn.pread(fin, offset, buf)
                if n <= 0:
                    break
                chunk = memoryview(buf.raw[:n])
                # Write only the 64 KiB pieces that hold data: zero pieces stay holes.
                for at in range(0, n, _PIECE):
                    piece = chunk[at:at + _PIECE]
                    if piece != zeros[:len(piece)]:
                        conn.pwrite(fout, offset + at, piece)
                offset += n
                progress.bytes += n
            conn.ftruncate(fout, size)

    copy_dir(src, dst)
    for d, atime, mtime in reversed(dirs):  # children first, so their writes are done
        conn.lutimes(d, atime, mtime)


def remove_tree(conn: Connection, path: str) -> None:
    """rm -rf over NFS; a missing path is fine."""
    try:
        entries = conn.listdir(path)
    except NfsError as exc:
        if exc.errno == errno.ENOENT:
            return
        if exc.errno != errno.ENOTDIR:
            raise
        _ignore_missing(conn.unlink, path)
        return
    for name, mode in entries:
        child = f"{path}/{name}"
        if stat.S_ISDIR(mode):
            remove_tree(conn, child)
        else:
            _ignore_missing(conn.unlink, child)
    _ignore_missing(conn.rmdir, path)


def _ignore_missing(fn: Callable[[str], None], path: str) -> None:
    try:
        fn(path)
    except NfsError as exc:
        if exc.errno != errno.ENOENT:
            raise
