"""volumeLayout: image on the node: a filesystem image file on the share, on a loop device.

The volume's directory is NFS-mounted under nodeStateDir/<backend>/<volume>, its `disk.img`
attached to a loop device, and the device staged like any block device (node/devices.py): mkfs
on first use, mounted at staging, or the device node itself for block access. The size is the
image's, so it is enforced; one node at a time (RWO), since two kernels must never mount one
ext4/xfs. NodeUnstage carries no volume context: the share mount's presence says the layout.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable

from ... import errors
from ...node import bounded, devices, filesystems, loop, mounts
from ..base import Capability, Condition

IMAGE_FILE = "disk.img"
# Beside the image while a node has it staged, naming the node: the node's own fence behind the
# attach step (.berth/attachments), since a node force-detached by the CO may still have the
# image mounted. Copies and ControllerPublish to another node honour it too.
ATTACHED_FILE = "attached"


class ImageAttacher:
    def __init__(self, state_dir: str, timeout: float, node_id: str) -> None:
        # Resolved once (it is local): the kernel records loop backing files resolved, and
        # devices_of compares without resolving (that would stat the NFS mount).
        self.state_dir = os.path.realpath(state_dir)
        self.timeout = timeout
        self.node_id = node_id

    def share_dir(self, local_id: str) -> str:
        return os.path.join(self.state_dir, local_id)

    def image(self, local_id: str) -> str:
        return os.path.join(self.share_dir(local_id), IMAGE_FILE)

    def devices_of(self, local_id: str) -> list[str]:
        # No realpath of the image: that would stat the NFS mount, which a dead server blocks.
        return loop.attached(self.image(local_id), resolve=False)

    def is_image(self, local_id: str) -> bool:
        return mounts.mount_at(self.share_dir(local_id)) is not None

    def stage(self, local_id: str, staging: str, cap: Capability, fs_type: str,
              mount_share: Callable[[str], None], read_only: bool) -> None:
        where = self.share_dir(local_id)
        mounted = claimed = made = False
        device = ""
        attached_before = self.devices_of(local_id)
        try:
            if mounts.mount_at(where) is None:
                made = not os.path.isdir(where)
                os.makedirs(where, 0o700, exist_ok=True)
                mount_share(where)
                mounted = True
            if not os.path.exists(self.image(local_id)):
                raise errors.FailedPrecondition(
                    f"{IMAGE_FILE} is missing from the volume's directory on the server")
            claimed = self._claim(where)
            device = loop.attach(self.image(local_id))
            if cap.block:
                devices.stage_block(device, staging, read_only)
            else:
                devices.stage_filesystem(device, staging, fs_type, cap, read_only)
        except BaseException:
            # Undo only what this call did: the volume may be staged elsewhere on this node.
            if device and device not in attached_before:
                loop.detach(device)
            if claimed:
                _remove_marker(where)
            if mounted:
                mounts.unmount(where, wait=self.timeout)
            if made or mounted:  # the mountpoint this call made (or filled) goes too
                with contextlib.suppress(OSError):
                    os.rmdir(where)
            raise

    def _claim(self, where: str) -> bool:
        """Hold the image for this node with the marker beside it (a second fence behind the
        attach step: a force-detached node may still have it mounted); True when this call made
        the marker."""
        marker = os.path.join(where, ATTACHED_FILE)
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            with open(marker) as f:
                holder = f.read().strip()
            if holder != self.node_id:
                raise errors.FailedPrecondition(
                    f"the image volume is still staged on node {holder!r}; it can be used by one "
                    f"node at a time (if that node is gone for good and its kernel with it, "
                    f"remove {ATTACHED_FILE} from the volume's directory on the server)"
                ) from None
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self.node_id)
        return True

    def unstage(self, local_id: str, staging: str) -> None:
        # Never lazily: a filesystem detached with data unwritten would write it into the image
        # whenever the server returns, perhaps while another node has the image mounted.
        devices.unstage(staging, lazy=False)
        for device in self.devices_of(local_id):
            loop.detach(device)
        if self.devices_of(local_id):  # still busy: detach only marked it to clear later
            raise errors.Unavailable("the volume's loop device is still in use; retry")
        where = self.share_dir(local_id)
        if mounts.mount_at(where) is not None:
            # Bounded: the server may be gone, and then the marker stays (this node may
            # stage again; another node is told whose it is).
            with contextlib.suppress(errors.Unavailable):
                bounded.call(f"release:{where}", _remove_marker, where, timeout=self.timeout)
        mounts.unmount(where, wait=self.timeout)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(where)

    def owns(self, local_id: str, path: str, block: bool | None = None) -> bool:
        """Whether `path` (a staging path, or with block=None whatever publish binds from)
        shows this volume's device or its filesystem."""
        attached = self.devices_of(local_id)
        if not attached:
            return False
        if block is None:
            try:
                block = stat.S_ISBLK(os.stat(path).st_mode)
            except OSError:
                return False
        elif block:
            path = devices.block_target(path)
        return devices.shows_device(path, attached, block)

    def expand(self, local_id: str, volume_path: str) -> int:
        size = 0
        # The controller grew the file on the server; an open makes this node's NFS client
        # fetch its new size (its cached attributes could be a minute old) before the loop
        # device asks.
        mounts.touch_open(self.image(local_id))
        try:
            block = stat.S_ISBLK(os.stat(volume_path).st_mode)
        except OSError:
            block = False
        for device in self.devices_of(local_id):
            loop.refresh_size(device)
            # A raw block volume's filesystem, if any, belongs to its user: never resize it.
            found = "" if block else filesystems.detect(device)
            if found and mounts.mount_at(volume_path) is not None:
                filesystems.grow_online(device, volume_path, found)
            size = loop.device_size(device)
        if not size:
            raise errors.FailedPrecondition("the volume is not staged on this node")
        return size

    def condition(self, local_id: str) -> Condition | None:
        """None when the volume is not an image staged here (the caller checks the mount)."""
        if not self.is_image(local_id):
            return None
        if not self.devices_of(local_id):
            return Condition(True, "the volume's loop device is gone")
        return Condition(False, "")


def _remove_marker(where: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(where, ATTACHED_FILE))
