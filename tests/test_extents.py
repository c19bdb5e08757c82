"""node/extents.py on real filesystems: extent maps read in windows give the same answer as in
one piece (extents that straddle a window keep their physical mapping when cut), resuming from
an offset leaves out only what ends before it, and files on tmpfs (no FIEMAP) fall back to
SEEK_DATA and comparing bytes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from csi_driver.node import extents

from .conftest import needs_root
from .harness import MiB, mount_filesystem, unmount_filesystem

pytestmark = needs_root
KiB = 1024
WRITES = [(1 * MiB - 4 * KiB, 12 * KiB, 1), (3 * MiB - 64 * KiB, 2 * MiB, 2), (9 * MiB, 4 * KiB, 3)]
LATER = [(1 * MiB, 4 * KiB, 4), (4 * MiB, 8 * KiB, 5), (15 * MiB, 4 * KiB, 6)]
SIZE = 16 * MiB


def _write(path: Path, writes: list[tuple[int, int, int]]) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, length, byte in writes:
            os.pwrite(fd, bytes([byte]) * length, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _pair(root: Path) -> tuple[int, int]:
    vol = root / "vol"
    vol.write_bytes(b"")
    os.truncate(vol, SIZE)
    _write(vol, WRITES)
    subprocess.run(["cp", "--reflink=auto", "--sparse=always", vol, root / "a"], check=True)
    _write(vol, LATER)
    subprocess.run(["cp", "--reflink=auto", "--sparse=always", vol, root / "b"], check=True)
    return os.open(root / "a", os.O_RDONLY), os.open(root / "b", os.O_RDONLY)


def _ranges(writes: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    return list(extents.coalesce(sorted((o, n) for o, n, _ in writes)))


@pytest.mark.parametrize("fs", ["xfs", "tmpfs"])
def test_windows_resume_and_fallback(fs: str, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    if fs == "tmpfs":
        root = tmp_path / "t"
        root.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(root)], check=True)
    else:
        root = mount_filesystem(tmp_path, fs, size="320M")
    try:
        a, b = _pair(root)
        maps_decide = fs == "xfs"  # reflinks: the maps decide; tmpfs: bytes are compared
        whole = list(extents.changed(a, b, SIZE, maps_decide=maps_decide))
        assert whole == _ranges(LATER)
        assert list(extents.allocated(a, SIZE)) == _ranges(WRITES)
        monkeypatch.setattr(extents, "WINDOW", MiB)  # the 2 MiB write straddles 3 windows
        assert list(extents.changed(a, b, SIZE, maps_decide=maps_decide)) == whole
        assert list(extents.allocated(a, SIZE)) == _ranges(WRITES)
        # From 4 MiB + 4 KiB on: what ends before may be left out, the rest must be there.
        resumed = list(extents.changed(a, b, SIZE, maps_decide=maps_decide,
                                       start=4 * MiB + 4 * KiB))
        assert [r for r in resumed if r[0] + r[1] > 4 * MiB + 4 * KiB] == [
            (4 * MiB, 8 * KiB), (15 * MiB, 4 * KiB)]
        os.close(a)
        os.close(b)
    finally:
        if fs == "tmpfs":
            subprocess.run(["umount", str(root)], check=True)
        else:
            unmount_filesystem(root)
