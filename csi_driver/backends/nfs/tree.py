"""Whole-tree operations over one libnfs connection: copy (for snapshots, restores and clones)
and remove (for the trash purger).

The copy keeps what `cp -a` keeps on a filesystem without xattrs: modes, owners, times, symlinks,
hard links and holes. Holes are kept by not writing blocks of zeros and setting the length last,
so a sparse file stays sparse on any server that allocates lazily.

Holes are found by reading: libnfs 4.0 (Debian libnfs13) speaks NFSv3 and v4.0, which have no
SEEK, and its nfs_lseek answers SEEK_DATA/SEEK_HOLE as SEEK_END (the file's size, rc 0), which
would pass every file off as one hole. So a large file is read in ranges by all the copy's
connections at once, and the zero test compares bytes (memcmp), not memoryviews (per element:
ten times slower, 16 s of CPU per 10 GiB).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from .libnfs import Connection, NfsError, Stat

_PIECE = 64 << 10
_ZEROS = bytes(_PIECE)
_ZEROS_READ = bytes(1 << 20)  # Connection.readmax is at most this
# Files above this are copied in ranges of this size, by every worker at once.
_RANGE = 256 << 20


@dataclass
class Progress:
    files: int = 0
    bytes: int = 0  # payload bytes read from the source (holes excluded)
    cancelled: Callable[[], bool] = field(default=lambda: False)


class Cancelled(Exception):
    pass


def copy_tree(connect: Callable[[], Connection], src: str, dst: str,
              progress: Progress | None = None, workers: int = 4) -> None:
    """Copy directory `src` to `dst` (which must not exist) with everything in it.

    One connection walks the tree and makes the directories; `workers` more copy the files, since
    a file costs about ten round trips and a single connection would spend its time waiting.
    """
    progress = progress or Progress()
    walker = connect()
    try:
        files: list[tuple[str, str, Stat]] = []
        links: list[tuple[str, str]] = []  # (first copy, further name) of hard-linked files
        first_name: dict[int, str] = {}
        dirs: list[tuple[str, Stat]] = []

        def walk(s: str, d: str) -> None:
            st = walker.lstat(s)
            walker.mkdir(d, 0o700)
            dirs.append((d, st))
            entries = walker.listdir(s)
            # libnfs follows symlinks in a path: a directory that a pod swapped for a symlink
            # while we listed it would pull another volume's names into this copy.
            again = walker.lstat(s)
            if not stat.S_ISDIR(again.mode) or again.ino != st.ino:
                raise NfsError(errno.ELOOP, f"{s} changed while it was copied; retry")
            for name, mode in entries:
                if progress.cancelled():
                    raise Cancelled
                cs, cd = f"{s}/{name}", f"{d}/{name}"
                if stat.S_ISDIR(mode):
                    walk(cs, cd)
                    continue
                est = walker.lstat(cs)
                if stat.S_ISREG(est.mode) and est.nlink > 1:
                    if est.ino in first_name:
                        links.append((first_name[est.ino], cd))
                        continue
                    first_name[est.ino] = cd
                if stat.S_ISREG(est.mode) or stat.S_ISLNK(est.mode):
                    files.append((cs, cd, est))
                # sockets, fifos and devices have no place on a volume copy

        walk(src, dst)
        # A large file: made and sized here, filled in ranges by the workers, then given its
        # owner, mode and times once every range is in.
        large = [(s, d, st) for s, d, st in files if stat.S_ISREG(st.mode) and st.size > _RANGE]
        tasks: list[_Task] = [(s, d, st, 0, -1) for s, d, st in files
                              if not (stat.S_ISREG(st.mode) and st.size > _RANGE)]
        for s, d, st in large:
            with walker.open(d, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600) as fout:
                walker.ftruncate(fout, st.size)
            tasks += [(s, d, st, at, min(at + _RANGE, st.size))
                      for at in range(0, st.size, _RANGE)]
        _parallel(connect, tasks, workers, progress)
        for _, d, st in large:
            _finish(walker, d, st, progress)
        for target, name in links:
            walker.link(target, name)
        for d, st in reversed(dirs):  # children first: their creation changed the parents' times
            walker.lchown(d, st.uid, st.gid)
            walker.chmod(d, stat.S_IMODE(st.mode))
            walker.lutimes(d, st.atime_ns, st.mtime_ns)
    finally:
        walker.close()


# (source, copy, source's stat, range start, range end): end -1 is the whole file or link.
_Task = tuple[str, str, Stat, int, int]


def _parallel(connect: Callable[[], Connection], files: list[_Task],
              workers: int, progress: Progress) -> None:
    lock = threading.Lock()
    queue = iter(files)
    failure: list[BaseException] = []

    def work() -> None:
        try:
            with connect() as conn:
                buf = ctypes.create_string_buffer(conn.readmax)
                while not failure:
                    with lock:
                        item = next(queue, None)
                    if item is None:
                        return
                    if item[4] < 0:
                        _copy_one(conn, *item[:3], buf, progress)
                    else:
                        _copy_range(conn, *item, buf, progress)
        except BaseException as exc:
            failure.append(exc)

    threads = [threading.Thread(target=work, daemon=True)
               for _ in range(max(1, min(workers, len(files))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failure:
        raise failure[0]


def _copy_one(conn: Connection, s: str, d: str, st: Stat, buf: ctypes.Array[ctypes.c_char],
              progress: Progress) -> None:
    if stat.S_ISLNK(st.mode):
        conn.symlink(conn.readlink(s), d)
        conn.lchown(d, st.uid, st.gid)
    else:
        with conn.open(d, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600) as fout:
            _fill(conn, s, fout, st, 0, st.size, buf, progress)
            # Always: zero pieces at the end were not written, and the file may have shrunk.
            conn.ftruncate(fout, st.size)
        _finish(conn, d, st, progress)
        return
    conn.lutimes(d, st.atime_ns, st.mtime_ns)
    progress.files += 1


def _copy_range(conn: Connection, s: str, d: str, st: Stat, start: int, end: int,
                buf: ctypes.Array[ctypes.c_char], progress: Progress) -> None:
    """Bytes start..end of a large file into its copy, which the walker made at full size."""
    with conn.open(d, os.O_WRONLY | os.O_NOFOLLOW) as fout:
        _fill(conn, s, fout, st, start, end, buf, progress)


def _fill(conn: Connection, s: str, fout: int, st: Stat, start: int, end: int,
          buf: ctypes.Array[ctypes.c_char], progress: Progress) -> None:
    with conn.open(s, os.O_RDONLY | os.O_NOFOLLOW) as fin:
        # The file opened must be the one the walk saw, not one a swapped path leads to.
        if conn.fstat(fin).ino != st.ino:
            raise NfsError(errno.ELOOP, f"{s} changed while it was copied; retry")
        offset = start
        while offset < end:
            if progress.cancelled():
                raise Cancelled
            n = conn.pread(fin, offset, buf)
            if n <= 0:
                break
            n = min(n, end - offset)
            chunk = ctypes.string_at(buf, n)  # one copy (buf.raw[:n] makes two)
            if chunk != _ZEROS_READ[:n]:  # most of a sparse image: one memcmp per read
                # Write only the 64 KiB pieces that hold data: zero pieces stay holes.
                for at in range(0, n, _PIECE):
                    piece = chunk[at:at + _PIECE]
                    if piece != _ZEROS[:len(piece)]:
                        conn.pwrite(fout, offset + at, piece)
            offset += n
            progress.bytes += n


def _finish(conn: Connection, d: str, st: Stat, progress: Progress) -> None:
    conn.lchown(d, st.uid, st.gid)
    conn.chmod(d, stat.S_IMODE(st.mode))  # after chown, which may clear set-id bits
    conn.lutimes(d, st.atime_ns, st.mtime_ns)
    progress.files += 1


def remove_tree(conn: Connection, path: str) -> None:
    """rm -rf over NFS; a missing path is fine.

    Deleted volumes may still be mounted, and a pod could swap a directory for a symlink to `/`
    mid-way: libnfs would follow it. So every sub-directory is first renamed (which never follows
    the last component) to a fresh name beside `path`, and only ever listed there, where every
    component above the tenant's own names is ours.
    """
    place = os.path.dirname(path)
    todo = [path]
    while todo:
        current = todo.pop()
        try:
            entries = conn.listdir(current)
        except NfsError as exc:
            if exc.errno == errno.ENOENT:
                continue
            if exc.errno != errno.ENOTDIR:
                raise
            _ignore_missing(conn.unlink, current)
            continue
        for name, mode in entries:
            child = f"{current}/{name}"
            if not stat.S_ISDIR(mode):
                _ignore_missing(conn.unlink, child)
                continue
            flat = f"{place}/rm-{uuid.uuid4().hex}"
            try:
                conn.rename(child, flat)
            except NfsError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                continue
            if stat.S_ISDIR(conn.lstat(flat).mode):
                todo.append(flat)
            else:
                _ignore_missing(conn.unlink, flat)
        try:
            conn.rmdir(current)
        except NfsError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                raise  # ENOTEMPTY: written to meanwhile; the next purge round finishes it


def _ignore_missing(fn: Callable[[str], None], path: str) -> None:
    try:
        fn(path)
    except NfsError as exc:
        if exc.errno != errno.ENOENT:
            raise
