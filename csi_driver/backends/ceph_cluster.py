"""Connections to a Ceph cluster (RBD and CephFS backends) through librados, with bounded waits
and readable errors.

Credentials come from the request's CSI secrets (userID/userKey) or the backend config; the key
is handed to librados in memory (the `key` option), so it never touches the disk on the
controller. Connections are cached per credential: connecting costs ~10 ms, an RPC ~1 ms.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from .. import errors, requestid
from .ceph_config import CephClusterConfig

T = TypeVar("T")
MAX_CONNECTIONS = 8
# Commands (in threads) to a mgr that does not answer, after which calls fail at once.
MAX_STUCK_COMMANDS = 8
_USER_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")


@dataclass(frozen=True)
class Credentials:
    user: str
    key: str

    def __repr__(self) -> str:  # never show the key, even in a traceback
        return f"Credentials(user={self.user!r})"


def credentials(config: CephClusterConfig, secrets: Mapping[str, str]) -> Credentials:
    user = secrets.get("userID") or config.userID
    key = secrets.get("userKey", "")
    if not key and config.userKeyFile and user == config.userID:
        try:
            with open(config.userKeyFile) as f:
                key = f.read().strip()
        except OSError as exc:
            raise errors.FailedPrecondition(
                f"cannot read userKeyFile {config.userKeyFile}: {exc.strerror}") from None
    if not user or not key:
        raise errors.InvalidArgument(
            "Ceph credentials missing: pass secrets userID and userKey (for example through "
            "csi.storage.k8s.io/provisioner-secret-name) or set userID and userKeyFile in the "
            "backend config"
        )
    if not _USER_RE.fullmatch(user):  # it reaches CEPH_ARGS and keyring headers on the node
        raise errors.InvalidArgument(f"Ceph user name {user!r} has characters a name cannot have")
    try:  # librados prints a key it cannot decode to stderr: check its structure first
        raw = base64.b64decode(key, validate=True)
        # a cephx key: u16 type (1 = AES), 8 bytes creation time, u16 length (16), the secret
        valid = len(raw) == 28 and struct.unpack_from("<HxxxxxxxxH", raw) == (1, 16)
    except (ValueError, struct.error):
        valid = False
    if not valid:
        raise errors.InvalidArgument(
            f"the key of Ceph user {user!r} is malformed (expected a base64 cephx key)")
    return Credentials(user, key)


def translate(exc: Exception, user: str, what: str) -> errors.CsiError:
    """A librados/librbd exception as the CSI error an operator can act on."""
    import rados

    # librbd's exceptions by name: a CephFS-only host may have no python3-rbd to import.
    rbd_error = type(exc).__name__ if type(exc).__module__ == "rbd" else ""
    text = f"{what}: {type(exc).__name__}"
    if (isinstance(exc, rados.PermissionDeniedError | rados.PermissionError)
            or rbd_error == "PermissionError"):
        return errors.PermissionDenied(
            f"{what}: Ceph refused user {user!r} (wrong key or missing caps)")
    if isinstance(exc, rados.InvalidArgumentError) and what.startswith("connecting"):
        return errors.InvalidArgument(
            f"{what}: the key of user {user!r} is malformed (expected a base64 cephx key)")
    if (isinstance(exc, rados.TimedOut | rados.InterruptedOrTimeoutError)
            or rbd_error == "Timeout"):
        return errors.Unavailable(f"{what}: the Ceph cluster did not answer in time")
    if isinstance(exc, rados.ObjectNotFound) or rbd_error == "ImageNotFound":
        return errors.NotFound(f"{what}: not found")
    if rbd_error in ("NoSpace", "DiskQuotaExceeded"):
        return errors.ResourceExhausted(f"{what}: the pool is full or over quota")
    if rbd_error == "ImageBusy":
        return errors.FailedPrecondition(f"{what}: the image is in use")
    return errors.Internal(f"{text} {exc}")


class _Handle:
    """A librados handle and how many calls use it: it is shut down only once evicted and idle,
    never under a call (rados_shutdown frees what the call still uses)."""

    def __init__(self, rados_handle: Any) -> None:
        self.rados = rados_handle
        self.users = 0
        self.evicted = False


class Cluster:
    """librados handles per credential, opened on demand and kept for reuse."""

    def __init__(self, config: CephClusterConfig, pool: str = "", namespace: str = "",
                 commands_in_threads: bool = False) -> None:
        self.config = config
        # librados (16.2) crashes when a mgr command it timed out is answered later (the
        # MgrClient frees the request first): a backend that talks to the mgr turns librados'
        # command timeout off and bounds mon and mgr commands with a thread of its own.
        self.commands_in_threads = commands_in_threads
        self._stuck = 0  # commands given up on that have not returned
        # Where call() and ioctx() work: the RBD pool, or the CephFS metadata pool.
        self.pool = pool
        self.namespace = namespace
        self._handles: OrderedDict[str, _Handle] = OrderedDict()
        self._lock = threading.Lock()

    def _conf(self, creds: Credentials) -> dict[str, str]:
        timeout = str(self.config.timeoutSeconds)
        conf = {
            "key": creds.key,
            "keyring": "",  # the key above is all it needs: no default keyring lookups
            "client_mount_timeout": timeout,
            "rados_mon_op_timeout": "0" if self.commands_in_threads else timeout,
            "rados_osd_op_timeout": timeout,
            "log_to_stderr": "false",
            "err_to_stderr": "false",
            "log_file": "",
            # clone v2: restores and clones never need a protected parent snapshot.
            "rbd_default_clone_format": "2",
        }
        if self.config.monitors:
            conf["mon_host"] = ",".join(self.config.monitors)
        return conf

    def _connect(self, creds: Credentials) -> Any:
        import rados

        # Without cephConf no file is read at all: the monitors come from the config.
        handle = rados.Rados(rados_id=creds.user, conffile=self.config.cephConf or None,
                             conf=self._conf(creds))
        try:
            handle.connect()  # bounded by client_mount_timeout, not by connect(timeout=)
        except Exception as exc:
            handle.shutdown()
            raise translate(exc, creds.user, "connecting to the Ceph cluster") from None
        return handle

    @staticmethod
    def _slot(creds: Credentials) -> str:
        return hashlib.sha256(f"{creds.user}\0{creds.key}".encode()).hexdigest()

    def known(self, creds: Credentials) -> bool:
        with self._lock:
            return self._slot(creds) in self._handles

    @contextlib.contextmanager
    def _use(self, creds: Credentials) -> Iterator[Any]:
        slot = self._slot(creds)
        with self._lock:
            found = self._handles.get(slot)
            if found is not None:
                self._handles.move_to_end(slot)
                found.users += 1
        if found is None:
            fresh = _Handle(self._connect(creds))  # unlocked: a slow monitor stalls no one else
            with self._lock:
                found = self._handles.setdefault(slot, fresh)
                found.users += 1
                evicted = []
                while len(self._handles) > MAX_CONNECTIONS:
                    evicted.append(self._handles.popitem(last=False)[1])
            if found is not fresh:
                fresh.rados.shutdown()
            for old in evicted:
                self._retire(old)
        try:
            yield found.rados
        finally:
            with self._lock:
                found.users -= 1
                idle_and_gone = found.evicted and found.users == 0
            if idle_and_gone:
                found.rados.shutdown()

    def _retire(self, handle: _Handle) -> None:
        with self._lock:
            handle.evicted = True
            idle = handle.users == 0
        if idle:
            handle.rados.shutdown()

    def forget(self, creds: Credentials) -> None:
        """Drop a handle that failed (timed out, refused); calls still using it finish first."""
        with self._lock:
            handle = self._handles.pop(self._slot(creds), None)
        if handle is not None:
            self._retire(handle)

    def instance_ids(self) -> set[int]:
        """The RADOS client IDs of our own connections."""
        with self._lock:
            return {int(h.rados.get_instance_id()) for h in self._handles.values()}

    def mon_command(self, creds: Credentials, command: Mapping[str, Any], what: str
                    ) -> tuple[int, bytes]:
        ret, out, _ = self._command(creds, "mon_command", command, what)
        return ret, out

    def mgr_command(self, creds: Credentials, command: Mapping[str, Any], what: str
                    ) -> tuple[int, bytes, str]:
        """A ceph-mgr command (the CephFS volumes module): (return code, output, status text).
        One call on the cached connection costs a few ms; the `ceph` CLI ~190 ms more."""
        return self._command(creds, "mgr_command", command, what)

    def _command(self, creds: Credentials, kind: str, command: Mapping[str, Any], what: str
                 ) -> tuple[int, bytes, str]:
        def run() -> tuple[int, bytes, str]:
            with self._use(creds) as handle:
                try:
                    ret, out, status = getattr(handle, kind)(json.dumps(command), b"")
                except Exception as exc:
                    import rados

                    if isinstance(exc, rados.TimedOut | rados.PermissionDeniedError):
                        self.forget(creds)
                    raise translate(exc, creds.user, what) from None
            return int(ret), bytes(out), str(status)

        if not self.commands_in_threads:
            return run()
        # The thread keeps its handle in use, so it is never shut down under the call; it
        # ends when the mgr (or its successor) answers.
        daemon = "mgr" if kind == "mgr_command" else "monitors"
        with self._lock:
            if self._stuck >= MAX_STUCK_COMMANDS:  # no pile of threads while it is away
                raise errors.Unavailable(
                    f"{what}: {self._stuck} earlier commands to the Ceph {daemon} have not "
                    "returned yet")
        box: list[tuple[int, bytes, str] | BaseException] = []
        done = threading.Event()
        gave_up = threading.Event()

        def in_thread() -> None:
            try:
                box.append(run())
            except BaseException as exc:
                box.append(exc)
            with self._lock:
                done.set()
                if gave_up.is_set():
                    self._stuck -= 1

        threading.Thread(target=requestid.in_context(in_thread), name=f"ceph {kind}",
                         daemon=True).start()
        if not done.wait(self.config.timeoutSeconds):
            with self._lock:
                if not done.is_set():
                    gave_up.set()
                    self._stuck += 1
            if gave_up.is_set():
                raise errors.Unavailable(f"{what}: the Ceph {daemon} did not answer within "
                                         f"{self.config.timeoutSeconds}s")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    @contextlib.contextmanager
    def ioctx(self, creds: Credentials) -> Iterator[Any]:
        import rados

        with self._use(creds) as handle:
            try:
                ctx = handle.open_ioctx(self.pool)
            except rados.ObjectNotFound:
                raise errors.InvalidArgument(
                    f"pool {self.pool!r} does not exist in the Ceph cluster") from None
            except Exception as exc:
                if isinstance(exc, rados.TimedOut | rados.PermissionDeniedError):
                    self.forget(creds)
                raise translate(exc, creds.user, f"opening pool {self.pool!r}") from None
            try:
                if self.namespace:
                    ctx.set_namespace(self.namespace)
                yield ctx
            finally:
                ctx.close()

    def call(self, creds: Credentials, what: str, fn: Callable[[Any], T]) -> T:
        """Run `fn(ioctx)`, turning librados/librbd errors into CSI errors about `what`."""
        with self.ioctx(creds) as ctx:
            try:
                return fn(ctx)
            except errors.CsiError:
                raise
            except Exception as exc:
                import rados

                if not isinstance(exc, rados.Error) and type(exc).__module__ != "rbd":
                    raise
                raise translate(exc, creds.user, what) from None
