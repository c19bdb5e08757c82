"""CephFS on the node: the subvolume's path mounted once at the staging path, with the
volume's own credentials; NodePublish binds it (the node service does that part).

  kernel  `mount -t ceph` (needs the ceph kernel module): the production path
  fuse    ceph-fuse (no kernel module: restricted nodes, and the path our tests exercise)

The key reaches the tools through a keyring (kernel: a secret file) in a private directory that
is removed as soon as the mount stands; ceph-fuse keeps the key in memory to reconnect. Each
mount's source names the subvolume (`berth:<path>` for ceph-fuse, `<monitors>:<path>` for the
kernel), so ownership is read from the mount table alone: a stat of a CephFS whose MDS is gone
hangs, and even SIGKILL does not free the caller.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator

from ... import errors, faults
from ...node import bounded, mounts
from ..base import Condition, StageRequest
from ..ceph_cluster import Credentials
from .config import CephfsConfig

FUSE_SOURCE = "berth:"
FUSE_TYPE = "fuse.ceph-fuse"


# Options the mounters set themselves: a mount flag may not replace them (fsname and subtype
# are how a mount is told to be ours).
_OWN_OPTIONS = frozenset({"fsname", "subtype", "name", "secret", "secretfile", "mds_namespace",
                          "fs", "mon_addr"})


def _subvolume_path(context: dict[str, str], group: str, subvolume: str) -> str:
    """The volume context's data path, which must lie in the volume's own subvolume."""
    path = context.get("subvolumePath", "")
    if not re.fullmatch(rf"/volumes/{re.escape(group)}/{re.escape(subvolume)}/"
                        r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", path):
        raise errors.InvalidArgument(
            f"volume context subvolumePath {path!r} is not in subvolume {subvolume!r} of "
            f"group {group!r}")
    return path


def _options(flags: list[str]) -> list[str]:
    for option in flags:
        if option.partition("=")[0].strip() in _OWN_OPTIONS:
            raise errors.InvalidArgument(
                f"mount option {option!r} is the driver's to set, not a mount flag's")
    return flags


class Mounter:
    def __init__(self, config: CephfsConfig) -> None:
        self.config = config
        self._keys_dir = os.path.join(config.nodeStateDir, "keys")
        self._cleaned = False
        self._clean_lock = threading.Lock()

    def _wait(self) -> float:
        return 3.0 * self.config.timeoutSeconds

    @contextlib.contextmanager
    def _files(self, creds: Credentials) -> Iterator[tuple[str, str, str]]:
        """(ceph.conf, keyring, secret file) in a private directory gone when the block ends."""
        with self._clean_lock:
            if not self._cleaned:  # what a crash left behind, before this process's first
                shutil.rmtree(self._keys_dir, ignore_errors=True)
                self._cleaned = True
        os.makedirs(self._keys_dir, 0o700, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="op-", dir=self._keys_dir)
        try:
            conf = os.path.join(tmp, "ceph.conf")
            t = self.config.timeoutSeconds
            with open(conf, "w") as f:
                if self.config.cephConf:
                    with open(self.config.cephConf) as base:
                        f.write(base.read() + "\n")
                else:
                    f.write(f"[global]\nmon_host = {','.join(self.config.monitors)}\n")
                # One ceph-fuse per volume: no pid file or admin socket to collide on.
                f.write(f"[client]\nclient_mount_timeout = {t}\nrados_mon_op_timeout = {t}\n"
                        "admin_socket =\npid_file =\nlog_file =\nlog_to_stderr = false\n")
            keyring, secret = os.path.join(tmp, "keyring"), os.path.join(tmp, "secret")
            for path, text in ((keyring, f"[client.{creds.user}]\n\tkey = {creds.key}\n"),
                               (secret, creds.key)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(text)
            yield conf, keyring, secret
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- stage ---------------------------------------------------------------------------
    def stage(self, request: StageRequest, subvolume: str, creds: Credentials) -> None:
        if request.capability.block:
            raise errors.FailedPrecondition("a CephFS volume has no block device")
        path = _subvolume_path(dict(request.context), self.config.subvolumeGroup, subvolume)
        fs_name = request.context.get("fsName") or self.config.fsName
        if fs_name != self.config.fsName:
            raise errors.InvalidArgument(
                f"volume context fsName {fs_name!r} is not this backend's filesystem "
                f"{self.config.fsName!r}")
        options = _options([
            *self.config.mountOptions,
            *(o for flag in request.capability.mount_flags for o in flag.split(",") if o)])
        if request.capability.read_only:
            options.append("ro")
        if self.config.mounter == "fuse":
            self._mount_fuse(creds, fs_name, path, request.staging_path, options)
        else:
            self._mount_kernel(creds, fs_name, path, request.staging_path, options)

    def _mount_fuse(self, creds: Credentials, fs_name: str, path: str, target: str,
                    options: list[str]) -> None:
        with self._files(creds) as (conf, keyring, _):
            err_path = os.path.join(os.path.dirname(conf), "stderr")
            fuse_opts = ",".join([f"fsname={FUSE_SOURCE}{path}", "subtype=ceph-fuse", *options])
            with open(err_path, "wb") as err:
                # -f: in the foreground of its own session, outliving this RPC and a driver
                # restart; it exits when its mount point is unmounted.
                proc = subprocess.Popen(
                    ["ceph-fuse", "-f", "-c", conf, "-n", f"client.{creds.user}",
                     "--keyring", keyring, "--client_fs", fs_name, "-r", path,
                     "-o", fuse_opts, target],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                    start_new_session=True)
            threading.Thread(target=proc.wait, name="ceph-fuse-reaper", daemon=True).start()
            deadline = time.monotonic() + self._wait()
            while self.mounted(target) != path:
                if proc.poll() is not None or time.monotonic() > deadline:
                    # Unmount before the process goes: a ceph-fuse killed while mounted leaves
                    # an MDS session that holds its caps until the MDS gives up on it.
                    with contextlib.suppress(errors.CsiError):
                        if mounts.mount_at(target) is not None:  # nothing foreign was there
                            mounts.unmount(target, wait=2.0)
                    proc.terminate()
                    try:
                        proc.wait(2.0)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                    with open(err_path, errors="replace") as f:
                        message = _messages(f.read())
                    raise _mount_error(creds.user, path, message or "no answer in time")
                time.sleep(0.01)
        faults.point("stage")

    def _mount_kernel(self, creds: Credentials, fs_name: str, path: str, target: str,
                      options: list[str]) -> None:
        if not self.config.monitors:
            raise errors.InvalidArgument("mounter kernel needs monitors in the backend config")
        with self._files(creds) as (_, _, secret):
            opts = [f"name={creds.user}", f"secretfile={secret}", f"mds_namespace={fs_name}",
                    *options]
            argv = ["mount", "-t", "ceph", "-o", ",".join(opts),
                    f"{','.join(_v1(m) for m in self.config.monitors)}:{path}", target]
            try:
                done = subprocess.run(argv, capture_output=True, text=True,
                                      timeout=self._wait(), check=False)
            except subprocess.TimeoutExpired:
                raise errors.Unavailable(
                    f"the CephFS mount of {path} did not finish within {self._wait():.0f}s "
                    "(monitors or MDS unreachable?)") from None
            if done.returncode != 0:
                raise _mount_error(creds.user, path, (done.stderr or done.stdout).strip())

    # -- unstage -------------------------------------------------------------------------
    def unstage(self, staging_path: str) -> None:
        pids = mounts.daemons_serving("ceph-fuse", staging_path)
        # A ceph-fuse mount made a moment ago can answer EBUSY for a short while (seen right
        # after NodeStage); a mount that stays busy is a user's and the error stands.
        deadline = time.monotonic() + 2.0
        while True:
            try:
                mounts.unmount(staging_path, wait=self.config.timeoutSeconds, lazy=False)
                # Unmounted cleanly: ceph-fuse flushes what it still holds and exits by itself
                # (1-2 s); killing it then could lose acknowledged writes. One that has not
                # gone after a generous grace cannot reach its MDS and is ended, off the RPC.
                grace = 4.0 * self.config.timeoutSeconds
                for pid in pids:
                    threading.Thread(target=_end, args=(pid, grace, "ceph-fuse", staging_path),
                                     kwargs={"wait_first": True}, name="ceph-fuse-end",
                                     daemon=True).start()
                return
            except errors.FailedPrecondition:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
            except (errors.Unavailable, OSError):
                break
        # The filesystem does not answer (MDS or cluster gone): detach lazily, and end its
        # ceph-fuse, which never exits by itself then and holds callers in D state.
        mounts.unmount(staging_path, wait=1.0)
        for pid in pids:
            _end(pid, 2.0, "ceph-fuse", staging_path)

    @staticmethod
    def mounted(path: str) -> str | None:
        """The CephFS path mounted at `path` by one of our mounters, if any."""
        entry = mounts.mount_at(path)
        if entry is None:
            return None
        if entry.fs_type == FUSE_TYPE and entry.source.startswith(FUSE_SOURCE):
            return entry.source[len(FUSE_SOURCE):]
        if entry.fs_type == "ceph" and ":/" in entry.source:
            return entry.source[entry.source.index(":/") + 1:]
        return None

    def owns(self, subvolume: str, path: str) -> bool:
        """Whether the mount at `path` (a staging path or a bind of it) is of `subvolume`."""
        source = self.mounted(path)
        return source is not None and source.startswith(
            f"/volumes/{self.config.subvolumeGroup}/{subvolume}/")

    # -- health and usage ----------------------------------------------------------------
    def condition(self, volume_path: str) -> Condition:
        try:
            # A lookup of a fresh name, not only an open: ceph-fuse serves opens from its
            # cache while its MDS is away.
            bounded.call(f"open:{volume_path}", mounts.answers, volume_path,
                         timeout=self.config.timeoutSeconds)
        except errors.Unavailable:
            return Condition(True, f"{volume_path} does not answer (MDS or cluster "
                                   "unreachable?)")
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                return Condition(True, f"{volume_path}: the ceph-fuse client is gone; the "
                                       "next publish mounts it again")
            return Condition(True, f"{volume_path}: {exc.strerror}")
        return Condition(False, "")

    def usage(self, volume_path: str) -> tuple[int, int] | None:
        """(quota, used bytes) from CephFS's own counters: statfs shows the quota rounded
        down to 4 MiB."""
        def read() -> tuple[int, int]:
            return (int(os.getxattr(volume_path, "ceph.quota.max_bytes")),
                    int(os.getxattr(volume_path, "ceph.dir.rbytes")))

        try:
            quota, used = bounded.call(f"usage:{volume_path}", read,
                                       timeout=self.config.timeoutSeconds)
        except (OSError, ValueError, errors.Unavailable):
            return None
        return (quota, used) if quota else None


def _end(pid: int, grace: float, tool: str, mount_point: str, wait_first: bool = False
         ) -> None:
    """SIGTERM the `tool` process serving `mount_point` (after `grace` for it to exit by itself
    with `wait_first`), SIGKILL it 2 s later; each signal only while that pid still is that
    process (pids are reused)."""
    def signal_it(sig: int) -> bool:
        if pid not in mounts.daemons_serving(tool, mount_point):
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        return True

    def gone_within(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while os.path.exists(f"/proc/{pid}"):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    if wait_first and gone_within(grace):
        return
    if signal_it(signal.SIGTERM) and not gone_within(2.0):
        signal_it(signal.SIGKILL)


def _v1(monitor: str) -> str:
    """A monitor as mount.ceph takes it: of an address vector "[v2:IP:P2,v1:IP:P1]" the v1
    address (the kernel client speaks msgr1 by default)."""
    if monitor.startswith(("[v1:", "[v2:")):
        for addr in monitor.strip("[]").split(","):
            if addr.startswith("v1:"):
                return addr[3:]
        return monitor.strip("[]").split(",")[0].split(":", 1)[-1]
    return monitor


def _messages(stderr: str) -> str:
    """ceph-fuse's complaints without its banners and log prefixes (time, thread, level)."""
    lines = []
    for line in stderr.splitlines():
        if "ceph-fuse[" in line or "newargv" in line or not line.strip():
            continue
        lines.append(re.sub(r"^\S+T\S+ [0-9a-f]+ +-?\d+ ", "", line.strip()))
    return "; ".join(lines)[-500:]


def _mount_error(user: str, path: str, message: str) -> errors.CsiError:
    low = message.lower()
    if any(s in low for s in ("unknown filesystem type", "no such device",
                               "not supported by the system")):
        return errors.FailedPrecondition(
            f"this node cannot mount CephFS with the kernel client (no ceph kernel module): "
            f"{message}; load the module or set mounter: fuse")
    if any(s in low for s in ("permission denied", "operation not permitted", "(1)",
                               "auth_bad_method", "(13)")):
        return errors.PermissionDenied(
            f"Ceph refused user {user!r} the mount of {path} (wrong key or missing caps): "
            f"{message}")
    if "no such file" in low or "(2)" in low:
        return errors.NotFound(f"{path} does not exist on the filesystem: {message}")
    if "timed out" in low or "(110)" in low or "no answer" in low:
        return errors.Unavailable(f"the mount of {path} got no answer (monitors or MDS "
                                  f"unreachable?): {message}")
    return errors.Internal(f"the mount of {path} failed: {message}")
