"""Which byte ranges of a file hold data, and which differ between two files, read from the
filesystem's extent maps (FIEMAP) rather than from the data.

Two snapshot files whose extents at the same offset map to the same physical blocks hold the
same bytes there: on reflink filesystems (xfs, btrfs) a copy shares every block and a write
gives the written range new ones, so the maps alone decide. Where they cannot (plain copies on
ext4, encoded or inline extents, a filesystem without FIEMAP), the two ranges are compared
byte for byte, and only those ranges are read.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
FIEMAP_FLAG_SYNC = 0x1  # flush first, so delayed allocations have their blocks
_HEADER = struct.Struct("=QQIIII")  # start, length, flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQ16xI12x")  # logical, physical, length, flags
_BATCH = 512  # extents per ioctl
_LAST, _UNWRITTEN = 0x1, 0x800
# Extents whose physical address says nothing about their bytes: unknown or delayed location,
# compressed or encrypted data, data packed with other files' (inline, tail, unaligned).
_OPAQUE = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400
BLOCK = 4096  # the unit of a byte comparison, and of what it reports
_CHUNK = 1 << 20  # bytes read at a time when comparing
# Bytes mapped at a time: a 1 GiB window of 4 KiB extents is at most 262,144 of them.
WINDOW = 1 << 30


@dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    length: int
    physical: int  # -1: unknown (the bytes must be compared)

    @property
    def end(self) -> int:
        return self.offset + self.length


def _fiemap(fd: int, start: int, end: int) -> Iterator[Extent]:
    while start < end:
        buf = bytearray(_HEADER.size + _BATCH * _EXTENT.size)
        _HEADER.pack_into(buf, 0, start, end - start, FIEMAP_FLAG_SYNC, 0, _BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        mapped = _HEADER.unpack_from(buf, 0)[3]
        if mapped == 0:
            return
        for i in range(mapped):
            logical, physical, length, flags = _EXTENT.unpack_from(
                buf, _HEADER.size + i * _EXTENT.size)
            if not flags & _UNWRITTEN:  # preallocated: reads as zeros, as a hole does
                yield Extent(logical, length, -1 if flags & _OPAQUE else physical)
            start = logical + length
            if flags & _LAST:
                return


def _seek_data(fd: int, start: int, end: int) -> Iterator[Extent]:
    """Data ranges from SEEK_DATA/SEEK_HOLE, for filesystems without FIEMAP (tmpfs)."""
    offset = start
    while offset < end:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data past offset
                return
            raise
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        yield Extent(data, hole - data, -1)
        offset = hole


def _clip(e: Extent, start: int, end: int) -> Extent:
    """The part of `e` within [start, end), its physical address moved along."""
    lo, hi = max(e.offset, start), min(e.end, end)
    return Extent(lo, hi - lo, e.physical + (lo - e.offset) if e.physical >= 0 else -1)


def extents(fd: int, start: int, end: int) -> list[Extent]:
    """The data extents of the open file `fd` within [start, end), in order."""
    try:
        found = list(_fiemap(fd, start, end))
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
            raise
        found = list(_seek_data(fd, start, end))
    return [_clip(e, start, end) for e in found if e.offset < end and e.end > start]


def _windows(start: int, size: int) -> Iterator[tuple[int, int]]:
    """[start, size) in WINDOW pieces, so a map in memory covers one piece at a time."""
    for lo in range(start // WINDOW * WINDOW, size, WINDOW):
        yield lo, min(lo + WINDOW, size)


def coalesce(ranges: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """(offset, length) ranges in order, touching ones joined."""
    current: tuple[int, int] | None = None
    for offset, length in ranges:
        if length <= 0:
            continue
        if current is not None and current[0] + current[1] >= offset:
            current = (current[0], max(current[0] + current[1], offset + length) - current[0])
            continue
        if current is not None:
            yield current
        current = (offset, length)
    if current is not None:
        yield current


def allocated(fd: int, size: int, start: int = 0) -> Iterator[tuple[int, int]]:
    """The ranges of the file's first `size` bytes that hold data (from about `start` on): its
    extents, never its bytes."""
    return coalesce((e.offset, e.length) for lo, hi in _windows(start, size)
                    for e in extents(fd, lo, hi))


def _segments(base: list[Extent], target: list[Extent], lo: int, hi: int
              ) -> Iterator[tuple[int, int, Extent | None, Extent | None]]:
    """[lo, hi) cut where either map (both within it) has a boundary: (start, end, the base
    extent there or None, the target extent there or None)."""
    cuts = {lo, hi}
    for e in (*base, *target):
        cuts.update((e.offset, e.end))
    points = sorted(cuts)
    i = j = 0
    for start, end in itertools.pairwise(points):
        while i < len(base) and base[i].end <= start:
            i += 1
        while j < len(target) and target[j].end <= start:
            j += 1
        b = base[i] if i < len(base) and base[i].offset <= start else None
        t = target[j] if j < len(target) and target[j].offset <= start else None
        if b is not None or t is not None:
            yield start, end, b, t


def _differing(base_fd: int, target_fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The BLOCK-sized pieces of [start, end) whose bytes differ between the two files."""
    offset = start
    while offset < end:
        n = min(_CHUNK, end - offset)
        a, b = os.pread(base_fd, n, offset), os.pread(target_fd, n, offset)
        if a != b:
            a, b = a.ljust(n, b"\0"), b.ljust(n, b"\0")  # past either file's end: zeros
            for k in range(0, n, BLOCK):
                if a[k:k + BLOCK] != b[k:k + BLOCK]:
                    yield offset + k, min(BLOCK, n - k)
        offset += n


def changed(base_fd: int, target_fd: int, size: int, *, maps_decide: bool, start: int = 0
            ) -> Iterator[tuple[int, int]]:
    """The ranges of the target's first `size` bytes (from about `start` on) that differ from
    the base. Data over a hole differs; the same physical blocks at the same offset do not;
    different blocks differ when `maps_decide` (the files are reflink copies, so a block was
    given anew only when it was written), else their bytes are compared."""

    def window(lo: int, hi: int) -> Iterator[tuple[int, int]]:
        base, target = extents(base_fd, lo, hi), extents(target_fd, lo, hi)
        for a, z, b, t in _segments(base, target, lo, hi):
            if b is None or t is None:
                yield a, z - a
            elif (b.physical >= 0 and t.physical >= 0
                  and b.physical - b.offset == t.physical - t.offset):
                continue
            elif maps_decide and b.physical >= 0 and t.physical >= 0:
                yield a, z - a
            else:
                yield from _differing(base_fd, target_fd, a, z)

    return coalesce(r for lo, hi in _windows(start, size) for r in window(lo, hi))
