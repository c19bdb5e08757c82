"""Staging a block device, whatever attached it (loop file, rbd-fuse, krbd, rbd-nbd):

  filesystem  mkfs on first use only (blkid decides), grown to the device, mounted at staging
  block       the device node bind-mounted on <staging>/device, which publish binds onward
"""

from __future__ import annotations

import os
import stat

from .. import errors
from ..capability import Capability
from . import filesystems, mounts

DEVICE_NAME = "device"


def block_target(staging_path: str) -> str:
    return os.path.join(staging_path, DEVICE_NAME)


def device_size(device: str) -> int:
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def stage_filesystem(device: str, staging: str, default_fs: str, cap: Capability,
                     read_only: bool) -> None:
    found = filesystems.detect(device)
    if not found:
        if read_only:
            raise errors.FailedPrecondition(
                "the volume holds no filesystem yet and is staged read-only: stage it for "
                "writing once first")
        filesystems.make(device, cap.fs_type or default_fs)
        found = cap.fs_type or default_fs
    elif cap.fs_type and cap.fs_type != found:
        raise errors.InvalidArgument(
            f"the volume holds a {found} filesystem; {cap.fs_type} was requested"
        )
    if found not in filesystems.SUPPORTED:  # what the volume's content claims: trust no more
        raise errors.FailedPrecondition(f"the volume holds {found!r}, not a supported filesystem")
    if (not read_only and found == "ext4"
            and filesystems.ext4_size(device) < device_size(device)):
        filesystems.grow_offline(device, found)  # restored or expanded while unstaged
    flags, data = mounts.split_options(cap.mount_flags, read_only)
    if read_only:  # a read-only mount must not replay a journal other readers see changing
        data.append("noload" if found == "ext4" else "norecovery")
    if not os.path.isdir(staging):
        os.mkdir(staging, 0o750)
    mounts.mount_fs(device, staging, found, flags, data)
    if found == "xfs" and not read_only:
        filesystems.grow_online(device, staging, found)


def stage_block(device: str, staging: str, read_only: bool) -> None:
    mounts.ensure_bind(device, block_target(staging), mounts.MS_RDONLY if read_only else 0,
                       make="file")


def unstage(staging: str, lazy: bool = True) -> None:
    """Unmount what stage_filesystem/stage_block put at `staging` (the device stays attached).

    <staging>/device is ours only when staging itself is no mount (a block stage): inside a
    mounted filesystem it is the user's file and must not be touched.
    """
    if mounts.unmount(staging, lazy=lazy):
        return
    device_file = block_target(staging)
    if os.path.lexists(device_file):
        mounts.unmount(device_file)
        os.unlink(device_file)


def shows_device(path: str, devices: list[str], block: bool) -> bool:
    """Whether `path` is `devices`' node (block) or a filesystem mounted from one of them."""
    try:
        st = os.stat(path)
        rdevs = {os.stat(d).st_rdev for d in devices}
    except OSError:
        return False
    if block:
        return stat.S_ISBLK(st.st_mode) and st.st_rdev in rdevs
    return st.st_dev in rdevs


def mount_point_of(devices: list[str]) -> str | None:
    """Where a filesystem on one of `devices` is mounted, if anywhere."""
    wanted = set()
    for d in devices:
        rdev = os.stat(d).st_rdev
        wanted.add(f"{os.major(rdev)}:{os.minor(rdev)}")
    return next((m.mount_point for m in mounts.mount_table() if m.device in wanted), None)
