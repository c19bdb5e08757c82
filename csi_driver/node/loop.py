"""Loop devices: find by backing file (sysfs, no exec), attach and detach (losetup).

Lookups go through /sys/block/loop*/loop/backing_file so that attachments survive a driver
restart without any record of our own: the kernel is the record.
"""

from __future__ import annotations

import glob
import os

from .commands import run

_SYS = "/sys/block"


def attached(backing_file: str, resolve: bool = True) -> list[str]:
    """Every loop device whose backing file is `backing_file` (resolve=False: a path known to
    be free of symlinks, which then is not looked at: on NFS that could block)."""
    want = os.path.realpath(backing_file) if resolve else os.path.normpath(backing_file)
    found = []
    for entry in glob.glob(f"{_SYS}/loop*/loop/backing_file"):
        try:
            with open(entry) as f:
                backing = f.read().rstrip("\n")
        except OSError:  # detached while we looked
            continue
        if backing == want:
            found.append("/dev/" + entry.split("/")[3])
    return sorted(found)


def attach(backing_file: str) -> str:
    """The loop device for `backing_file`, attaching one if none is attached yet."""
    existing = attached(backing_file)
    if existing:
        return existing[0]
    return run("losetup", "--find", "--show", "--direct-io=off", backing_file).strip()


def detach_all(backing_file: str) -> None:
    for device in attached(backing_file):
        detach(device)


def detach(device: str) -> None:
    run("losetup", "--detach", device)


def refresh_size(device: str) -> None:
    """Make the device see a backing file that has grown."""
    run("losetup", "--set-capacity", device)


def device_size(device: str) -> int:
    with open(f"{_SYS}/{os.path.basename(device)}/size") as f:
        return int(f.read()) * 512


def backing_of(device: str) -> str | None:
    try:
        with open(f"{_SYS}/{os.path.basename(device)}/loop/backing_file") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None
