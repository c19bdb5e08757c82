"""hostPath on the node: staging each layout, and telling whether a mount shows a volume.

  directory  bind mount of volumes/<id> on the staging path
  image      loop device on disk.img, mkfs on first use only, mounted on the staging path
  block      loop device on disk.img, its device node bind-mounted on <staging>/device
The kernel's loop and mount tables are the only record, so a restart finds everything again.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from ... import errors, faults
from ...node import devices, filesystems, loop, mounts
from ..base import Capability, Condition
from .store import BLOCK, DIRECTORY, IMAGE, IMAGE_FILE, Record, Store


class Attacher:
    def __init__(self, store: Store) -> None:
        self.store = store

    def _image(self, local_id: str) -> str:
        return self.store.path(self.store.volumes, local_id, IMAGE_FILE)

    def stage(self, local_id: str, rec: Record, staging: str, cap: Capability) -> None:
        if cap.block != (rec.layout == BLOCK):
            raise errors.FailedPrecondition(
                f"the volume is {'raw block' if rec.layout == BLOCK else 'a filesystem'}; "
                f"it cannot be staged as {'block' if cap.block else 'a mount'}"
            )
        read_only = (rec.mutable.get("readOnly") == "true"
                     or cap.read_only)
        if rec.layout == DIRECTORY:
            flags = mounts.bind_flags(cap.mount_flags, read_only)
            mounts.ensure_bind(self.store.payload(self.store.volumes, local_id, rec), staging,
                               flags)
            return
        device = loop.attach(self._image(local_id))
        faults.point("stage")
        try:
            if rec.layout == BLOCK:
                devices.stage_block(device, staging, read_only)
            else:
                devices.stage_filesystem(device, staging, rec.fs_type, cap, read_only)
        except BaseException:
            loop.detach_all(self._image(local_id))
            raise

    def unstage(self, local_id: str, staging: str) -> None:
        devices.unstage(staging)
        loop.detach_all(self._image(local_id))

    def owns(self, local_id: str, rec: Record, path: str) -> bool:
        if rec.layout == DIRECTORY:
            return mounts.same_object(self.store.payload(self.store.volumes, local_id, rec), path)
        return devices.shows_device(path, loop.attached(self._image(local_id)),
                                    rec.layout == BLOCK)

    def expand(self, local_id: str, rec: Record, volume_path: str) -> None:
        for device in loop.attached(self._image(local_id)):
            loop.refresh_size(device)
            if rec.layout == IMAGE:
                filesystems.grow_online(device, volume_path, rec.fs_type)

    def condition(self, local_id: str, rec: Record | None, volume_path: str) -> Condition:
        if rec is None:
            return Condition(True, "the volume no longer exists on this node")
        payload = self.store.payload(self.store.volumes, local_id, rec)
        if not os.path.exists(payload):
            return Condition(True, f"the volume's backing {os.path.basename(payload)} is missing")
        if rec.layout != DIRECTORY and not loop.attached(payload):
            return Condition(True, "the volume's loop device is gone")
        if not self.owns(local_id, rec, volume_path):
            return Condition(True, f"{volume_path} no longer shows the volume")
        return Condition(False, "")

    def thaw_leftover(self, local_id: str, rec: Record) -> None:
        if rec.layout == IMAGE:
            mount_point = devices.mount_point_of(loop.attached(self._image(local_id)))
            if mount_point is not None:
                filesystems.thaw(mount_point, must=False)

    @contextlib.contextmanager
    def frozen(self, local_id: str, rec: Record) -> Iterator[None]:
        """Hold writes to a mounted image volume still while its blocks are copied."""
        mount_point = None
        if rec.layout == IMAGE:
            mount_point = devices.mount_point_of(loop.attached(self._image(local_id)))
        if mount_point is None:
            yield
            return
        filesystems.freeze(mount_point)
        try:
            yield
        finally:
            filesystems.thaw(mount_point)
