"""The node side of Cinder volumes.

nova    Nova attached the disk to this server; it appears as /dev/disk/by-id/virtio-<the first
        20 characters of the volume ID> (virtio-blk), scsi-0QEMU_QEMU_HARDDISK_<...> (virtio-scsi)
        or wwn-0x<ID without dashes>, a moment after Nova reports the volume in-use
cinder  the controller made a Cinder attachment; publish_context carries its connection info,
        and the node connects it: `rbd` through the RBD backend's mounters (krbd, rbd-nbd,
        rbd-fuse). Cinder's rbd connection info names the cephx user but carries no key: the
        node takes it from a node-stage secret `userKey` or from rbdUserKeyFile.
What a stage attached is written under nodeStateDir/staged before it is attached, so unstage
(which gets no publish_context) and a restarted driver know what to detach.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
import threading
import time
import urllib.request
from typing import Any

from ... import errors
from ...node import devices, filesystems
from ..base import Condition, NodeExpandRequest, StageRequest
from .config import CinderConfig

log = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")  # a pool or image name, nothing more


class NodeSide:
    def __init__(self, config: CinderConfig) -> None:
        self.config = config
        self._zone: str | None = None
        self._lock = threading.Lock()

    # -- where the node is ---------------------------------------------------------------
    def zone(self) -> str:
        """The node's availability zone, from Nova's metadata service (nova mode), cached."""
        with self._lock:
            if self._zone is not None:
                return self._zone
        zone = ""
        if self.config.attach == "nova":
            url = f"{self.config.metadataURL.rstrip('/')}/openstack/latest/meta_data.json"
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    zone = str(json.loads(resp.read()).get("availability_zone", ""))
            except (OSError, ValueError) as exc:
                log.warning("cannot read the metadata service at %s (%s): give the node's zone "
                            "with --topology %s=<zone>", url, exc, self.config.zoneKey)
        with self._lock:
            self._zone = zone
        return zone

    # -- what a stage attached -------------------------------------------------------------
    def _state_file(self, local_id: str) -> str:
        return os.path.join(self.config.nodeStateDir, "staged", f"{local_id}.json")

    def _read_state(self, local_id: str) -> dict[str, Any] | None:
        try:
            with open(self._state_file(local_id)) as f:
                return dict(json.load(f))
        except (OSError, ValueError):
            return None

    def _write_state(self, local_id: str, state: dict[str, Any]) -> None:
        path = self._state_file(local_id)
        os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _rbd(self, state: dict[str, Any]) -> Any:
        from ..rbd.attach import Attacher
        from ..rbd.config import RbdConfig

        config = RbdConfig(type="rbd", pool=state["pool"], monitors=list(state["monitors"]),
                           mounter=self.config.rbdMounter, fsType=self.config.fsType,
                           timeoutSeconds=self.config.timeoutSeconds, userID=state["user"],
                           userKeyFile=self.config.rbdUserKeyFile,
                           nodeStateDir=os.path.join(self.config.nodeStateDir, "rbd"))
        return Attacher(config), config

    # -- nova: the disk Nova attached --------------------------------------------------------
    def _device(self, local_id: str, wait: bool) -> str | None:
        short = local_id[:20]
        names = (f"virtio-{short}", f"scsi-0QEMU_QEMU_HARDDISK_{short}",
                 f"scsi-0QEMU_QEMU_HARDDISK_{local_id}", f"wwn-0x{local_id.replace('-', '')}")
        deadline = time.monotonic() + (self.config.timeoutSeconds if wait else 0)
        while True:
            for name in names:
                link = os.path.join(self.config.devicesDir, name)
                target = os.path.realpath(link)
                # udev's links point into /dev; anything else is not a disk Nova gave us.
                with contextlib.suppress(OSError):
                    if target.startswith("/dev/") and stat.S_ISBLK(os.stat(target).st_mode):
                        return target
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    # -- the node operations ---------------------------------------------------------------
    def stage(self, request: StageRequest) -> None:
        ctx, cap = request.publish_context, request.capability
        kind = ctx.get("cinder/type", "")
        read_only = cap.read_only
        if self.config.attach == "nova":
            device = self._device(request.local_id, wait=True)
            if device is None:
                raise errors.Unavailable(
                    f"no disk of volume {request.local_id} under {self.config.devicesDir} after "
                    f"{self.config.timeoutSeconds}s; is it attached to this server?")
            if cap.block:
                devices.stage_block(device, request.staging_path, read_only)
            else:
                devices.stage_filesystem(device, request.staging_path, self.config.fsType, cap,
                                         read_only)
            return
        if kind != "rbd":
            raise errors.FailedPrecondition(
                f"Cinder's connection type {kind or '(none: was the volume published?)'!r} is "
                "not one this node can connect (rbd is)")
        pool, _, image = ctx.get("cinder/name", "").partition("/")
        monitors = [m for m in ctx.get("cinder/monitors", "").split(",") if m]
        if not (_NAME.fullmatch(pool) and _NAME.fullmatch(image) and monitors):
            raise errors.InvalidArgument("publish_context lacks the rbd image or its monitors")
        # Cinder names a volume's image after its ID (volume_name_template, volume-%s): a
        # context naming another image is not this volume's, whoever wrote it.
        if request.local_id not in image:
            raise errors.InvalidArgument(
                f"publish_context names image {image!r}, which is not volume "
                f"{request.local_id}'s")
        state = {"type": "rbd", "pool": pool, "image": image, "monitors": monitors,
                 "user": ctx.get("cinder/user", "")}
        from ..ceph_cluster import credentials

        attacher, rbd_config = self._rbd(state)
        given = {"userID": str(state["user"])}
        if request.secrets.get("userKey"):
            given["userKey"] = request.secrets["userKey"]
        creds = credentials(rbd_config, given)
        self._write_state(request.local_id, state)
        attacher.stage(image, request.staging_path, cap, creds)

    def unstage(self, local_id: str, staging_path: str) -> None:
        state = self._read_state(local_id)
        if state is None:
            devices.unstage(staging_path)
            return
        attacher, _ = self._rbd(state)
        attacher.unstage(state["image"], staging_path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._state_file(local_id))

    def _attached(self, local_id: str) -> tuple[list[str], Any, dict[str, Any] | None]:
        state = self._read_state(local_id)
        if state is None:
            device = self._device(local_id, wait=False)
            return ([device] if device else []), None, None
        attacher, _ = self._rbd(state)
        return attacher.attached(state["image"]), attacher, state

    def owns(self, local_id: str, path: str) -> bool:
        found, _, _ = self._attached(local_id)
        return bool(found) and (devices.shows_device(path, found, True)
                                or devices.shows_device(path, found, False))

    def expand(self, request: NodeExpandRequest) -> int:
        found, attacher, state = self._attached(request.local_id)
        if attacher is not None and state is not None:
            return int(attacher.expand(state["image"], request.volume_path, request.required))
        if not found:
            raise errors.FailedPrecondition(
                f"volume {request.local_id} is not attached to this node")
        device = found[0]
        rescan = f"/sys/class/block/{os.path.basename(device)}/device/rescan"
        if os.path.exists(rescan):  # SCSI disks learn a new size only when rescanned
            with open(rescan, "w") as f:
                f.write("1")
        deadline = time.monotonic() + self.config.timeoutSeconds
        while devices.device_size(device) < request.required and time.monotonic() < deadline:
            time.sleep(0.1)
        if devices.device_size(device) < request.required:
            raise errors.Unavailable(f"the disk of volume {request.local_id} is still smaller "
                                     f"than {request.required} bytes; retry")
        if not devices.shows_device(request.volume_path, found, True):
            filesystems.grow_online(device, request.volume_path, filesystems.detect(device))
        return devices.device_size(device)

    def condition(self, local_id: str, volume_path: str) -> Condition:
        found, _, _ = self._attached(local_id)
        if not found:
            return Condition(True, f"volume {local_id} is no longer attached to this node")
        if not self.owns(local_id, volume_path):
            return Condition(True, f"{volume_path} no longer shows volume {local_id}")
        return Condition(False, "")
