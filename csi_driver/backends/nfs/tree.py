"""Whole-tree operations over libnfs connections: copy (for snapshots, restores and clones)
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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from ... import requestid
from .libnfs import Connection, NfsError, Stat
from .pipeline import Pipeline

_PIECE = 64 << 10
_ZEROS = bytes(_PIECE)
_ZEROS_READ = bytes(1 << 20)  # Connection.readmax is at most this
# Files above this are copied in ranges of this size, by every worker at once.
_RANGE = 256 << 20
# Regular files up to this size are copied by pipelines, _DEPTH of them in flight on each.
_SMALL = 1 << 20
_DEPTH = 32


# (start, end) byte ranges of a file that hold data, at the copy's 64 KiB piece granularity.
Extents = list[tuple[int, int]]


@dataclass
class Progress:
    files: int = 0
    bytes: int = 0  # payload bytes read from the source (holes excluded)
    cancelled: Callable[[], bool] = field(default=lambda: False)
    # The pieces written into each large file's copy (see data_map), by path below dst.
    written: dict[str, Extents] = field(default_factory=dict)

    def data_map(self) -> dict[str, Extents]:
        """Each large file's data ranges, merged and sorted: what a later copy of this copy
        needs to read, instead of reading every hole."""
        out = {}
        for rel, pieces in self.written.items():
            merged: Extents = []
            for start, end in sorted(pieces):
                if merged and start <= merged[-1][1]:
                    merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
                else:
                    merged.append((start, end))
            out[rel] = merged
        return out


class Cancelled(Exception):
    pass


def copy_tree(connect: Callable[[str], Connection], src: str, dst: str,
              progress: Progress | None = None, workers: int = 4,
              known: Mapping[str, Extents] | None = None) -> None:
    """Copy directory `src` to `dst` (which must not exist) with everything in it.

    `known` gives the data ranges of large files in `src` (a path below it -> extents), for a
    source nobody writes to, such as a snapshot: only those ranges are read, the rest are holes.

    `connect(dir)` mounts the share's `dir` ("/" is its root). One connection walks the tree and
    makes the directories; `workers` more copy the files, each with a connection mounted at `src`
    and one at `dst`. libnfs looks every component of a path up afresh, so short paths are
    what keeps a small file's copy to about fifteen round trips, not forty; and small files
    are copied many at a time on each pair (pipeline.py), the rest one call at a time.
    """
    progress = progress or Progress()
    walker = connect("/")
    try:
        files: list[tuple[str, Stat]] = []  # (path below src and dst, source's lstat)
        links: list[tuple[str, str]] = []  # (first copy, further name) of hard-linked files
        first_name: dict[int, str] = {}
        dirs: list[tuple[str, Stat]] = []

        def walk(rel: str, st: Stat) -> None:
            s = f"{src}/{rel}" if rel else src
            d = f"{dst}/{rel}" if rel else dst
            walker.mkdir(d, 0o700)
            dirs.append((rel, st))
            try:
                entries = walker.scandir(s)
                # libnfs follows symlinks in a path: a directory that a pod swapped for a
                # symlink while we listed it would pull another volume's names into this copy.
                again = walker.lstat(s)
            except NfsError as exc:
                if exc.errno != errno.ENOENT or not rel:
                    raise
                dirs.pop()  # removed since its parent was listed: left out, like a file
                walker.rmdir(d)
                return
            if not stat.S_ISDIR(again.mode) or again.ino != st.ino:
                raise NfsError(errno.ELOOP, f"{s} changed while it was copied; retry")
            for name, est in entries:
                if progress.cancelled():
                    raise Cancelled
                crel = f"{rel}/{name}" if rel else name
                if not est.ino:  # NFSv4 listings carry no inode numbers
                    est = walker.lstat(f"{s}/{name}")
                if stat.S_ISDIR(est.mode):
                    walk(crel, est)
                    continue
                if stat.S_ISREG(est.mode) and est.nlink > 1:
                    if est.ino in first_name:
                        links.append((first_name[est.ino], crel))
                        continue
                    first_name[est.ino] = crel
                if stat.S_ISREG(est.mode) or stat.S_ISLNK(est.mode):
                    files.append((crel, est))
                # sockets, fifos and devices have no place on a volume copy

        walk("", walker.lstat(src))
        # A large file: made and sized here, filled in ranges by the workers, then given its
        # owner, mode and times once every range is in.
        large = [(r, st) for r, st in files if stat.S_ISREG(st.mode) and st.size > _RANGE]
        tasks: list[_Task] = [(r, st, 0, -1) for r, st in files
                              if not (stat.S_ISREG(st.mode) and st.size > _RANGE)]
        for r, st in large:
            with walker.open(f"{dst}/{r}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600) as fout:
                walker.ftruncate(fout, st.size)
            progress.written[r] = []
            # No block allocated: all hole (a large file cannot hold inline data), nothing to read.
            extents = (known or {}).get(r, [(0, st.size)] if st.blocks else [])
            tasks += [(r, st, at, min(at + _RANGE, end, st.size))
                      for start, end in extents for at in range(start, min(end, st.size), _RANGE)]
        _parallel(lambda: (connect(src), connect(dst)), tasks, workers, progress)
        for r, st in large:
            with walker.open(f"{dst}/{r}", os.O_WRONLY | os.O_NOFOLLOW) as fout:
                _own(walker, fout, st)
            walker.lutimes(f"{dst}/{r}", st.atime_ns, st.mtime_ns)
            progress.files += 1
        for target, name in links:
            walker.link(f"{dst}/{target}", f"{dst}/{name}")
        for r, st in reversed(dirs):  # children first: their creation changed the parents' times
            d = f"{dst}/{r}" if r else dst
            walker.lchown(d, st.uid, st.gid)
            walker.chmod(d, stat.S_IMODE(st.mode))
            walker.lutimes(d, st.atime_ns, st.mtime_ns)
    finally:
        walker.close()


# (path below src and dst, source's stat, range start, range end): end -1 is the whole file
# or link.
_Task = tuple[str, Stat, int, int]


def _parallel(connect: Callable[[], tuple[Connection, Connection]], files: list[_Task],
              workers: int, progress: Progress) -> None:
    lock = threading.Lock()
    # Small regular files go through pipelines (many in flight per connection), the rest
    # (links, larger files, ranges of large ones) one call at a time, once a worker's
    # pipeline has run dry.
    small = iter([(rel, st) for rel, st, _, end in files
                  if end < 0 and stat.S_ISREG(st.mode) and st.size <= _SMALL])
    queue = iter([t for t in files
                  if not (t[3] < 0 and stat.S_ISREG(t[1].mode) and t[1].size <= _SMALL)])
    failure: list[BaseException] = []

    def next_small() -> Iterator[tuple[str, Stat]]:
        while not failure:
            with lock:
                item = next(small, None)
            if item is None:
                return
            yield item

    def tally(files: int, nbytes: int) -> None:
        with lock:
            progress.files += files
            progress.bytes += nbytes

    def work() -> None:
        try:
            sc, dc = connect()
            with sc, dc:
                pipeline = Pipeline(sc, dc, _DEPTH, tally, progress.cancelled)
                try:
                    pipeline.run(next_small())
                finally:
                    for rel in pipeline.vanished:  # their empty copies
                        _ignore_missing(dc.unlink, rel)
                buf = ctypes.create_string_buffer(min(sc.readmax, dc.readmax))
                while not failure:
                    with lock:
                        item = next(queue, None)
                    if item is None:
                        return
                    rel, st, start, end = item
                    if end < 0:
                        _copy_one(sc, dc, rel, st, buf, progress)
                    else:
                        with dc.open(rel, os.O_WRONLY | os.O_NOFOLLOW) as fout:
                            _fill(sc, dc, rel, fout, st, start, end, buf, progress,
                                  progress.written[rel])
        except BaseException as exc:
            failure.append(exc)

    threads = [threading.Thread(target=requestid.in_context(work), daemon=True)
               for _ in range(max(1, min(workers, len(files))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failure:
        raise failure[0]


def _copy_one(sc: Connection, dc: Connection, rel: str, st: Stat,
              buf: ctypes.Array[ctypes.c_char], progress: Progress) -> None:
    """One file or link; one that vanished from the source since the walk is left out."""
    try:
        if stat.S_ISLNK(st.mode):
            target = sc.readlink(rel)
        else:
            fin_check = sc.lstat(rel)  # gone? then nothing of it is made
            if not stat.S_ISREG(fin_check.mode):
                raise NfsError(errno.ELOOP, f"{rel} changed while it was copied; retry")
    except NfsError as exc:
        if exc.errno == errno.ENOENT:
            return
        raise
    if stat.S_ISLNK(st.mode):
        dc.symlink(target, rel)
        dc.lchown(rel, st.uid, st.gid)
    else:
        # No O_EXCL: libnfs resends a CREATE after a reconnect, and in a copy in progress
        # nobody else makes files.
        with dc.open(rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600) as fout:
            # Zero pieces at the end were not written, and the file may have shrunk: its copy
            # is as long as what was read.
            tail, length = _fill(sc, dc, rel, fout, st, 0, st.size, buf, progress)
            if not tail:
                dc.ftruncate(fout, length)
            _own(dc, fout, st)
    dc.lutimes(rel, st.atime_ns, st.mtime_ns)  # last: the close's COMMIT may touch them
    progress.files += 1


def _own(conn: Connection, fout: int, st: Stat) -> None:
    conn.fchown(fout, st.uid, st.gid)
    conn.fchmod(fout, stat.S_IMODE(st.mode))  # after chown, which may clear set-id bits


def _fill(sc: Connection, dc: Connection, rel: str, fout: int, st: Stat, start: int, end: int,
          buf: ctypes.Array[ctypes.c_char], progress: Progress,
          written: Extents | None = None) -> tuple[bool, int]:
    """Bytes start..end of `rel` into `fout`, noting each piece written in `written`. Returns
    whether the last piece read was written (then the copy is long enough: no truncate), and
    where reading stopped (`end`, or sooner for a file that shrank)."""
    tail = end == 0
    # `sc` is mounted at the source volume, and libnfs resolves every path (symlinks a pod
    # swapped in included) within its mount: whatever `rel` leads to now is the volume's own.
    with sc.open(rel, os.O_RDONLY | os.O_NOFOLLOW) as fin:
        offset = start
        while offset < end:
            if progress.cancelled():
                raise Cancelled
            n = sc.pread(fin, offset, buf)
            if n <= 0:
                break
            n = min(n, end - offset)
            chunk = ctypes.string_at(buf, n)  # one copy (buf.raw[:n] makes two)
            if chunk != _ZEROS_READ[:n]:  # most of a sparse image: one memcmp per read
                # Write only the 64 KiB pieces that hold data: zero pieces stay holes.
                for at in range(0, n, _PIECE):
                    piece = chunk[at:at + _PIECE]
                    if piece != _ZEROS[:len(piece)]:
                        dc.pwrite(fout, offset + at, piece)
                        tail = offset + at + len(piece) == end
                        if written is not None:
                            written.append((offset + at, offset + at + len(piece)))
            offset += n
            progress.bytes += n
    return tail and offset == end, offset


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
