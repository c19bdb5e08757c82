"""Copies that share blocks where the filesystem can (reflinks on xfs/btrfs) and keep holes,
ownership, modes, timestamps, xattrs and hard links everywhere else (cp -a)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat

from .commands import run

FICLONE = 0x40049409  # _IOW(0x94, 9, int) in linux/fs.h


def copy_tree(source_dir: str, dest_dir: str) -> None:
    """Copy the contents of `source_dir` into the existing `dest_dir`."""
    run("cp", "-a", "--reflink=auto", "--sparse=always", "--no-target-directory",
        source_dir, dest_dir)


def copy_file(source: str, dest: str) -> None:
    run("cp", "--reflink=auto", "--sparse=always", "--preserve=all", source, dest)


def reflinks(directory: str) -> bool | None:
    """Whether files in `directory` can share blocks (FICLONE works there); None when the
    probe could not run (no room for its one block, say)."""
    src, dst = os.path.join(directory, "probe-src"), os.path.join(directory, "probe-dst")
    try:
        with open(src, "w+b") as s, open(dst, "wb") as d:  # a clone reads its source
            s.write(b"\1" * 4096)
            s.flush()
            try:
                fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
            except OSError:  # ext4, tmpfs, xfs without reflink=1: EOPNOTSUPP; others EINVAL
                return False
        return True
    except OSError:
        return None
    finally:
        for path in (src, dst):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def allocated_bytes(path: str) -> int:
    """Bytes allocated to `path`: a file, or a tree (links not followed, each inode counted
    once). About what a copy that keeps holes, but shares no blocks, needs."""
    st = os.lstat(path)
    total = st.st_blocks * 512
    if not stat.S_ISDIR(st.st_mode):
        return total
    seen: set[tuple[int, int]] = set()
    for top, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            try:
                st = os.lstat(os.path.join(top, name))
            except FileNotFoundError:  # removed by a writer meanwhile
                continue
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total
