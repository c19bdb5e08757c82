"""gRPC server lifecycle: bind the endpoint, serve, and stop gracefully on SIGTERM/SIGINT."""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import socket
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from .csi import csi_pb2_grpc as pb_grpc
from .driver import Driver
from .errors import CsiError
from .interceptors import RpcInterceptor, RpcObserver
from .services.controller import ControllerService
from .services.group_controller import GroupControllerService
from .services.identity import IdentityService
from .services.node import NodeService
from .services.snapshot_metadata import SnapshotMetadataService

log = logging.getLogger(__name__)
MODES = ("all", "controller", "node")
GRACE_SECONDS = 30.0  # in-flight RPCs may finish within this after SIGTERM


class EndpointError(Exception):
    pass


@dataclass(frozen=True)
class Endpoint:
    grpc_address: str
    socket_path: str | None = None

    @classmethod
    def parse(cls, raw: str) -> Endpoint:
        if raw.startswith("unix://"):
            path = raw[len("unix://"):]
            if not os.path.isabs(path):
                raise EndpointError(f"{raw}: a unix endpoint needs an absolute path (unix:///...)")
            return cls(f"unix://{path}", path)
        if raw.startswith("tcp://"):
            return cls(raw[len("tcp://"):])
        raise EndpointError(f"{raw}: endpoint must start with unix:// or tcp://")


def _clear_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise EndpointError(f"{path} exists and is not a socket; refusing to remove it")
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: left over from a crash
        return
    finally:
        probe.close()
    raise EndpointError(f"another process is serving on {path}")


class Server:
    def __init__(self, driver: Driver, endpoint: Endpoint, mode: str = "all",
                 workers: int = 16, slow_ms: float = 10_000.0,
                 observer: RpcObserver | None = None) -> None:
        self.driver = driver
        self.endpoint = endpoint
        self._stop = threading.Event()
        self._grpc = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
            interceptors=[RpcInterceptor(slow_ms, observer)],
        )
        controller = mode in ("all", "controller")
        pb_grpc.add_IdentityServicer_to_server(IdentityService(driver, controller), self._grpc)
        if controller:
            pb_grpc.add_ControllerServicer_to_server(ControllerService(driver), self._grpc)
            pb_grpc.add_GroupControllerServicer_to_server(GroupControllerService(driver),
                                                         self._grpc)
            pb_grpc.add_SnapshotMetadataServicer_to_server(SnapshotMetadataService(driver),
                                                          self._grpc)
        if mode in ("all", "node"):
            pb_grpc.add_NodeServicer_to_server(NodeService(driver), self._grpc)

    def _warm_up(self) -> None:
        """Start every backend once (hostPath tidies up after a crash, NFS prepares its share),
        beside serving: a backend whose server is unreachable must not keep the others, or
        GetPluginInfo, waiting. The first RPC to a backend tries again if needed."""
        for name, backend in self.driver.backends.items():
            try:
                self.driver.ready(backend)
            except CsiError as exc:
                log.warning("backend %s is not ready yet: %s", name, exc.message)

    def start(self) -> None:
        path = self.endpoint.socket_path
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _clear_stale_socket(path)
            # The socket is born 0660 (kubelet and the sidecars share a group). The umask is the
            # process's: it is set only while the socket is bound, before any RPC or backend
            # start-up runs (under it hostPath made its directories 0600).
            old = os.umask(0o117)
        try:
            if self._grpc.add_insecure_port(self.endpoint.grpc_address) == 0:
                raise EndpointError(f"cannot listen on {self.endpoint.grpc_address}")
        except RuntimeError as exc:
            raise EndpointError(f"cannot listen on {self.endpoint.grpc_address}: {exc}") from None
        finally:
            if path:
                os.umask(old)
        if path:
            os.chmod(path, 0o660)
        self._grpc.start()
        threading.Thread(target=self._warm_up, name="warm-up", daemon=True).start()
        log.info("serving CSI %s on %s (node %s)", self.driver.settings.driver_name,
                 self.endpoint.grpc_address, self.driver.node.node_id)

    def stop(self, grace: float = GRACE_SECONDS) -> None:
        """Refuse new RPCs, let in-flight ones finish (up to `grace` seconds), remove the socket."""
        self._grpc.stop(grace).wait()
        if self.endpoint.socket_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.endpoint.socket_path)
        log.info("stopped")

    def run_until_signalled(self) -> None:
        def _on_signal(signum: int, _frame: object) -> None:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            self._stop.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        # A fatal signal (SIGSEGV, SIGABRT...) prints every thread's stack to stderr.
        faulthandler.enable()
        self.start()
        # The kernel may hand SIGTERM to one of gRPC's threads; a wait without a timeout would
        # then never return to the interpreter to run the handler (seen as a hung shutdown).
        while not self._stop.wait(0.5):
            pass
        # Shutting down never hangs: past the grace period (and 5 s more for the interpreter
        # to exit) the stacks go to the log and the process ends.
        faulthandler.dump_traceback_later(GRACE_SECONDS + 5, exit=True)
        self.stop(GRACE_SECONDS)
        faulthandler.dump_traceback_later(5, exit=True)
