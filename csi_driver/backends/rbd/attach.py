"""RBD on the node: make an image a block device with the configured mounter, then stage it.

  krbd  `rbd device map` (kernel rbd module): the production path
  nbd   `rbd-nbd map` (nbd module): for kernels without rbd, or newer librbd features
  fuse  `rbd-fuse` exposes the image as a file, a loop device makes it a block device: needs no
        kernel module, so it runs on restricted nodes (and is the path our tests exercise)
Existing attachments are found from the kernel (sysfs, the mount table, rbd-nbd's list), so a
driver restart with volumes staged maps nothing twice. Keys reach the tools through a keyring in
a private temporary directory that is removed as soon as the tool has connected.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator

from ... import errors, faults
from ...node import devices, filesystems, loop, mounts
from ...node.commands import run
from ..base import Capability, Condition
from ..ceph_cluster import Credentials
from .config import RbdConfig


class Attacher:
    def __init__(self, config: RbdConfig) -> None:
        self.config = config
        self._keys_dir = os.path.join(config.nodeStateDir, "keys")
        self._cleaned = False

    # -- credentials on disk, briefly ------------------------------------------------------
    @contextlib.contextmanager
    def _files(self, creds: Credentials) -> Iterator[tuple[str, str]]:
        """(ceph.conf, keyring) in a private directory that is gone when the block ends."""
        if not self._cleaned:  # keyrings a crash left behind (the block's end never came)
            shutil.rmtree(self._keys_dir, ignore_errors=True)
            self._cleaned = True
        os.makedirs(self._keys_dir, 0o700, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="op-", dir=self._keys_dir)  # mode 0700
        try:
            conf = self.config.cephConf or os.path.join(tmp, "ceph.conf")
            if not self.config.cephConf:
                with open(conf, "w") as f:
                    f.write(f"[global]\nmon_host = {','.join(self.config.monitors)}\n"
                            f"client_mount_timeout = {self.config.timeoutSeconds}\n"
                            f"rados_mon_op_timeout = {self.config.timeoutSeconds}\n")
            keyring = os.path.join(tmp, "keyring")
            fd = os.open(keyring, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"[client.{creds.user}]\n\tkey = {creds.key}\n")
            yield conf, keyring
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _spec(self, image: str) -> str:
        ns = f"{self.config.radosNamespace}/" if self.config.radosNamespace else ""
        return f"{self.config.pool}/{ns}{image}"

    # -- the three mounters ------------------------------------------------------------------
    def _fuse_dir(self, image: str) -> str:
        return os.path.join(self.config.nodeStateDir, "fuse", image)

    def attached(self, image: str) -> list[str]:
        """The block devices that show `image` on this node."""
        if self.config.mounter == "fuse":
            return loop.attached(os.path.join(self._fuse_dir(image), image))
        if self.config.mounter == "krbd":
            return _krbd_devices(self.config.pool, self.config.radosNamespace, image)
        return _nbd_devices(self.config.pool, self.config.radosNamespace, image)

    def attach(self, image: str, creds: Credentials, read_only: bool = False) -> str:
        found = self.attached(image)
        if found:
            return found[0]
        if self.config.mounter == "fuse":
            return self._attach_fuse(image, creds)
        with self._files(creds) as (conf, keyring):
            common = ["--id", creds.user, "--keyring", keyring, "-c", conf]
            if read_only:  # a ReadOnlyMany volume: nothing on this node may write to it
                common.append("--read-only")
            if self.config.mounter == "krbd":
                return run("rbd", "device", "map", *common, self._spec(image),
                           timeout=self.config.timeoutSeconds * 3).strip()
            return run("rbd-nbd", "map", *common, self._spec(image),
                       timeout=self.config.timeoutSeconds * 3).strip()

    def _attach_fuse(self, image: str, creds: Credentials) -> str:
        if self.config.radosNamespace:
            raise errors.InvalidArgument(
                "mounter fuse cannot reach RADOS namespaces (rbd-fuse has no option for them); "
                "use krbd or nbd")
        where = self._fuse_dir(image)
        exposed = os.path.join(where, image)
        if mounts.mount_at(where) is None:
            os.makedirs(where, 0o700, exist_ok=True)
            with self._files(creds) as (conf, keyring):
                env = {**os.environ, "CEPH_ARGS": f"--id {creds.user} --keyring {keyring}"}
                # -f keeps it in the foreground of its own session: it outlives this RPC and
                # a driver restart, and exits when its mount point is unmounted.
                proc = subprocess.Popen(
                    ["rbd-fuse", "-f", "-c", conf, "-p", self.config.pool, "-r", image, where],
                    env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, start_new_session=True)
                # Reap it when it exits (at unstage), or it stays a zombie of the driver.
                threading.Thread(target=proc.wait, name="rbd-fuse-reaper", daemon=True).start()
                deadline = time.monotonic() + self.config.timeoutSeconds
                while not os.path.exists(exposed):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        proc.kill()
                        mounts.unmount(where)
                        raise errors.Unavailable(
                            f"rbd-fuse could not open image {image} within "
                            f"{self.config.timeoutSeconds}s (cluster down or key refused?)")
                    time.sleep(0.02)
        faults.point("stage")
        return loop.attach(exposed)

    def detach(self, image: str) -> None:
        if self.config.mounter == "fuse":
            where = self._fuse_dir(image)
            loop.detach_all(os.path.join(where, image))
            if mounts.unmount(where):  # rbd-fuse exits with its mount
                with contextlib.suppress(OSError):
                    os.rmdir(where)
            # rbd-fuse closes the image (drops its watch) only as it exits, a moment after the
            # unmount: until then the image counts as attached and a DeleteVolume is refused.
            self._wait_exit(mounts.daemons_serving("rbd-fuse", where), image)
            return
        tool = ["rbd", "device", "unmap"] if self.config.mounter == "krbd" else ["rbd-nbd", "unmap"]
        for device in self.attached(image):
            run(*tool, device)

    def _wait_exit(self, pids: list[int], image: str) -> None:
        deadline = time.monotonic() + self.config.timeoutSeconds
        while any(_alive(p) for p in pids):
            if time.monotonic() > deadline:
                raise errors.Unavailable(
                    f"rbd-fuse of image {image} has not exited {self.config.timeoutSeconds}s "
                    "after its unmount; retry")
            time.sleep(0.01)

    # -- staging -----------------------------------------------------------------------------
    def stage(self, image: str, staging: str, cap: Capability, creds: Credentials) -> None:
        read_only = cap.read_only
        device = self.attach(image, creds, read_only)
        try:
            if cap.block:
                devices.stage_block(device, staging, read_only)
            else:
                devices.stage_filesystem(device, staging, self.config.fsType, cap, read_only)
        except BaseException:
            self.detach(image)
            raise

    def unstage(self, image: str, staging: str) -> None:
        devices.unstage(staging)
        self.detach(image)

    def owns(self, image: str, path: str) -> bool:
        found = self.attached(image)
        return devices.shows_device(path, found, True) or devices.shows_device(path, found, False)

    def expand(self, image: str, volume_path: str, required: int) -> int:
        found = self.attached(image)
        if not found:
            raise errors.FailedPrecondition(f"image {image} is not attached on this node")
        device = found[0]
        if self.config.mounter == "fuse":
            # rbd-fuse learns the new size from librbd's header watch, a moment after the resize.
            exposed = os.path.join(self._fuse_dir(image), image)
            deadline = time.monotonic() + self.config.timeoutSeconds
            while os.stat(exposed).st_size < required and time.monotonic() < deadline:
                time.sleep(0.05)
            loop.refresh_size(device)
        if required and devices.device_size(device) < required:
            raise errors.Unavailable(
                f"the device of image {image} is still smaller than {required} bytes; retry")
        if not devices.shows_device(volume_path, found, True):
            fs_type = filesystems.detect(device)
            filesystems.grow_online(device, volume_path, fs_type)
        return devices.device_size(device)

    def condition(self, image: str, volume_path: str) -> Condition:
        if not self.attached(image):
            return Condition(True, f"image {image} is no longer attached on this node")
        if not self.owns(image, volume_path):
            return Condition(True, f"{volume_path} no longer shows image {image}")
        return Condition(False, "")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _alive(pid: int) -> bool:
    """Running: a zombie (exited, not yet reaped) has closed its connections already."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:][:1] != b"Z"


def _krbd_devices(pool: str, namespace: str, image: str) -> list[str]:
    found = []
    for entry in glob.glob("/sys/bus/rbd/devices/*"):
        try:
            values = {k: _read(os.path.join(entry, k)) for k in ("pool", "name", "current_snap")}
            ns_file = os.path.join(entry, "pool_ns")
            ns = _read(ns_file) if os.path.exists(ns_file) else ""
        except OSError:
            continue
        if (values["pool"], ns, values["name"], values["current_snap"]) == (
                pool, namespace, image, "-"):
            found.append(f"/dev/rbd{os.path.basename(entry)}")
    return found


def _nbd_devices(pool: str, namespace: str, image: str) -> list[str]:
    if shutil.which("rbd-nbd") is None:
        return []
    listed = json.loads(run("rbd-nbd", "list-mapped", "--format", "json") or "[]")
    return [m["device"] for m in listed
            if (m.get("pool"), m.get("namespace", ""), m.get("image")) == (pool, namespace, image)
            and m.get("snap", "-") in ("-", "")]
