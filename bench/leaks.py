"""What must be gone at the end of a run: volumes, snapshots' copies, mounts, half-deleted data."""

from __future__ import annotations

import os
import re
import subprocess

from csi_driver.csi import csi_pb2 as pb

from .csi import Csi, RpcFailure


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo (octal).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_table() -> list[tuple[str, str]]:
    """(mount point, filesystem type) for every mount in our namespace, oldest first."""
    table = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            table.append((_unescape(left.split(" ")[4]), right.split(" ")[0]))
    return table


def fs_type_of(path: str) -> str:
    """The filesystem holding `path`: the longest mount point that contains it."""
    real = os.path.realpath(path)
    best, kind = "", "?"
    for point, fs in mount_table():
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fs
    return kind


def mounts_under(root: str, keep: tuple[str, ...] = ()) -> list[str]:
    prefix = os.path.realpath(root).rstrip("/") + "/"
    return [p for p, _ in mount_table() if p.startswith(prefix) and p not in keep]


def listed_volumes(csi: Csi) -> list[str]:
    """Volume IDs the driver still lists (bounded: at most 10 pages)."""
    found: list[str] = []
    token = ""
    for _ in range(10):
        page = csi.list_volumes(pb.ListVolumesRequest(max_entries=1000, starting_token=token))
        found += [e.volume.volume_id for e in page.entries]
        token = page.next_token
        if not token:
            break
    return found


def check_driver(csi: Csi) -> list[str]:
    """Leaks the driver itself can report; call after the final sweep, before stopping it."""
    try:
        left = listed_volumes(csi)
    except RpcFailure as exc:
        return [f"ListVolumes failed, volumes not checked: {exc}"]
    return [f"{len(left)} volume(s) still listed, e.g. {left[0]}"] if left else []


def check_disk(workdir: str, data_path: str, keep: tuple[str, ...]) -> list[str]:
    """Mounts under our directories and data the backend did not finish deleting."""
    leaks = [f"still mounted: {p}" for p in mounts_under(workdir, keep)]
    # hostPath layout: live objects in volumes/ snapshots/ groups/; half-made or half-deleted
    # ones in .tmp/ and .trash/.
    for sub in ("volumes", "snapshots", "groups", ".tmp", ".trash"):
        path = os.path.join(data_path, sub)
        if os.path.isdir(path) and os.listdir(path):
            leaks.append(f"{len(os.listdir(path))} entr(ies) left in {path}")
    return leaks


def force_unmount(paths: list[str]) -> None:
    """Detach leaked mounts (newest first) so the run can remove its directories."""
    for path in reversed(paths):
        subprocess.run(["umount", "-l", path], capture_output=True, check=False, timeout=60)
