"""A throwaway xfs, btrfs or ext4 filesystem on a loop device, so the backend can be measured on it.

Mounts made here live in the benchmark's private mount namespace (bench/run), but loop devices
are global: the device is always detached on the way out, errors included.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

GiB = 1 << 30
# reflink=1 lets an xfs backend clone and snapshot by sharing blocks instead of copying them.
MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}
PACKAGES = {"xfs": "xfsprogs", "ext4": "e2fsprogs", "btrfs": "btrfs-progs"}


class FsError(Exception):
    pass


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise FsError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip()


@contextmanager
def loop_filesystem(kind: str, workdir: str, size_gib: int) -> Iterator[str]:
    """Yield the mount point of a fresh `kind` filesystem in a sparse image under `workdir`."""
    if shutil.which(MKFS[kind][0]) is None:
        raise FsError(f"{MKFS[kind][0]} not found; install {PACKAGES[kind]}")
    image = os.path.join(workdir, f"{kind}.img")
    mount_point = os.path.join(workdir, kind)
    os.mkdir(mount_point)
    with open(image, "wb") as f:
        f.truncate(size_gib * GiB)  # sparse: costs only what mkfs and the volumes write
    try:
        _run([*MKFS[kind], image])
        device = _run(["losetup", "--find", "--show", image])
        try:
            _run(["mount", device, mount_point])
            try:
                yield mount_point
            finally:
                try:
                    _run(["umount", mount_point])
                except FsError:
                    _run(["umount", "-l", mount_point])  # detach now, let the kernel finish
                    raise
        finally:
            _run(["losetup", "-d", device])
    finally:
        os.unlink(image)
