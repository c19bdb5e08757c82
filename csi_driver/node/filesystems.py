"""Filesystems on block devices: detect, create, grow, freeze."""

from __future__ import annotations

import subprocess

from ..errors import Aborted, Internal, InvalidArgument
from .commands import run

SUPPORTED = ("ext4", "xfs")
# mkfs.xfs refuses smaller devices; ext4 works far lower, but a floor keeps journals sane.
MINIMUM_SIZE = {"ext4": 16 << 20, "xfs": 300 << 20}


def check_supported(fs_type: str) -> None:
    if fs_type not in SUPPORTED:
        raise InvalidArgument(
            f"filesystem {fs_type!r} is not supported; use one of {', '.join(SUPPORTED)}"
        )


def detect(device: str) -> str:
    """The filesystem type on `device`, or "" when it holds none (never format a used device)."""
    done = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", device],
                          capture_output=True, text=True, timeout=60, check=False)
    if done.returncode == 2:  # blkid: nothing recognised
        return ""
    if done.returncode != 0:
        raise Internal(f"blkid {device} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def make(device: str, fs_type: str) -> None:
    check_supported(fs_type)
    if fs_type == "ext4":
        # lazy init keeps mkfs fast on large sparse images; no reserved blocks on a volume.
        run("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1",
            device)
    else:
        run("mkfs.xfs", "-q", "-f", device)


def grow_offline(device: str, fs_type: str) -> None:
    """Grow an unmounted filesystem to its device (ext4 only; xfs grows once mounted)."""
    if fs_type == "ext4":
        run("e2fsck", "-f", "-p", device)
        run("resize2fs", device)


def grow_online(device: str, mount_point: str, fs_type: str) -> None:
    if fs_type == "ext4":
        run("resize2fs", device)
    elif fs_type == "xfs":
        run("xfs_growfs", mount_point)


def ext4_size(device: str) -> int:
    out = run("dumpe2fs", "-h", device)
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return int(fields["Block count"]) * int(fields["Block size"])


def freeze(mount_point: str) -> None:
    done = subprocess.run(["fsfreeze", "--freeze", mount_point], capture_output=True, text=True,
                          timeout=60, check=False)
    if done.returncode != 0:
        if "busy" in done.stderr.lower():  # frozen already: another copy of it is running
            raise Aborted(f"{mount_point} is being snapshotted by another operation; retry")
        raise Internal(f"fsfreeze {mount_point} failed: {done.stderr.strip()}")


def thaw(mount_point: str, must: bool = True) -> None:
    """Unfreeze; with must=False a filesystem that was not frozen is fine (start-up cleanup)."""
    if must:
        run("fsfreeze", "--unfreeze", mount_point)
    else:
        subprocess.run(["fsfreeze", "--unfreeze", mount_point], capture_output=True,
                       timeout=60, check=False)
