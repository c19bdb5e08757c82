"""hostPath on the node: staging each layout, and telling whether a mount shows a volume.

  directory  bind mount of volumes/<id> on the staging path
  image      loop device on disk.img, mkfs on first use only, mounted on the staging path
  block      loop device on disk.img, its device node bind-mounted on <staging>/device
The kernel's loop and mount tables are the only record, so a restart finds everything again.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator

from ... import errors, faults
from ...node import filesystems, loop, mounts
from ..base import AccessMode, Capability, Condition
from .store import BLOCK, DIRECTORY, IMAGE, IMAGE_FILE, Record, Store

READ_ONLY_MODES = (AccessMode.SINGLE_NODE_READER_ONLY, AccessMode.MULTI_NODE_READER_ONLY)
DEVICE_NAME = "device"


def block_target(staging_path: str) -> str:
    return os.path.join(staging_path, DEVICE_NAME)


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
        read_only = rec.mutable.get("readOnly") == "true" or cap.access_mode in READ_ONLY_MODES
        if rec.layout == DIRECTORY:
            flags = mounts.bind_flags(cap.mount_flags, read_only)
            mounts.ensure_bind(self.store.payload(self.store.volumes, local_id, rec), staging,
                               flags)
            return
        if rec.layout == BLOCK:
            device = loop.attach(self._image(local_id))
            faults.point("stage")
            mounts.ensure_bind(device, block_target(staging),
                               mounts.MS_RDONLY if read_only else 0, make="file")
            return
        current = mounts.mount_at(staging)
        if current is not None:
            if self.owns(local_id, rec, staging):
                return
            raise errors.AlreadyExists(f"{staging} already holds another mount")
        device = loop.attach(self._image(local_id))
        faults.point("stage")
        try:
            self._mount_image(device, rec, staging, cap, read_only)
        except BaseException:
            loop.detach_all(self._image(local_id))
            raise

    @staticmethod
    def _mount_image(device: str, rec: Record, staging: str, cap: Capability,
                     read_only: bool) -> None:
        found = filesystems.detect(device)
        if not found:
            filesystems.make(device, rec.fs_type)
            found = rec.fs_type
        elif cap.fs_type and cap.fs_type != found:
            raise errors.InvalidArgument(
                f"the volume holds a {found} filesystem; {cap.fs_type} was requested"
            )
        if found == "ext4" and filesystems.ext4_size(device) < loop.device_size(device):
            filesystems.grow_offline(device, found)  # restored/expanded while unstaged
        flags, data = mounts.split_options(cap.mount_flags, read_only)
        if not os.path.isdir(staging):
            os.mkdir(staging, 0o750)
        mounts.mount_fs(device, staging, found, flags, data)
        if found == "xfs" and not read_only:
            filesystems.grow_online(device, staging, found)

    def unstage(self, local_id: str, staging: str) -> None:
        device_file = block_target(staging)
        if os.path.lexists(device_file):
            mounts.unmount(device_file)
            os.unlink(device_file)
        mounts.unmount(staging)
        loop.detach_all(self._image(local_id))

    def owns(self, local_id: str, rec: Record, path: str) -> bool:
        if rec.layout == DIRECTORY:
            return mounts.same_object(self.store.payload(self.store.volumes, local_id, rec), path)
        try:
            st = os.stat(path)
            devices = {os.stat(d).st_rdev for d in loop.attached(self._image(local_id))}
        except OSError:
            return False
        if rec.layout == BLOCK:
            return stat.S_ISBLK(st.st_mode) and st.st_rdev in devices
        return st.st_dev in devices

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

    @contextlib.contextmanager
    def frozen(self, local_id: str, rec: Record) -> Iterator[None]:
        """Hold writes to a mounted image volume still while its blocks are copied."""
        mount_point = None
        if rec.layout == IMAGE:
            devices = {_dev_string(d) for d in loop.attached(self._image(local_id))}
            mount_point = next((m.mount_point for m in mounts.mount_table()
                                if m.device in devices), None)
        if mount_point is None:
            yield
            return
        filesystems.freeze(mount_point)
        try:
            yield
        finally:
            filesystems.thaw(mount_point)


def _dev_string(device: str) -> str:
    rdev = os.stat(device).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"
