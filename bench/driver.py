"""The driver under test as a child process: spawn, time start-up, sample memory, stop.

The child is `python -m csi_driver` itself (no shell in between), so its PID is the one whose
/proc/PID/status we read.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import yaml

from .csi import get_plugin_info_once

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLL_INTERVAL_S = 0.002
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 45.0  # the driver lets in-flight RPCs finish for up to 30 s on SIGTERM
RSS_INTERVAL_S = 0.02
PR_SET_PDEATHSIG = 1
RSS_MAX_SAMPLES = 200_000  # ~70 minutes at 20 ms: the loop stays bounded even if stop is missed


class DriverError(Exception):
    pass


@dataclass
class DriverProcess:
    proc: subprocess.Popen[bytes]
    socket_path: str
    log_path: str
    startup_ms: float
    socket_ms: float  # when the socket file appeared, for telling import time from bind time

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def stop(self) -> int:
        """SIGTERM and wait; the exit code is a finding when it is not 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise DriverError(
                f"driver ignored SIGTERM for {STOP_TIMEOUT_S:.0f}s; killed it") from None


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the benchmark dies, so no driver is orphaned."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def write_config(workdir: str, data_path: str, backends: dict[str, Any] | None = None) -> str:
    """The driver's config: one hostPath backend `local` in `data_path`, unless `backends`."""
    path = os.path.join(workdir, "config.yaml")
    if backends is None:
        backends = {"local": {"type": "hostpath", "path": data_path}}
    with open(path, "w") as f:
        yaml.safe_dump({"backends": backends}, f)
    return path


def start(workdir: str, data_path: str, source: str = REPO,
          backends: dict[str, Any] | None = None) -> DriverProcess:
    """Spawn the driver and poll GetPluginInfo until it answers; time both from the spawn.

    `source` is the checkout whose csi_driver runs (`python -m` imports from the working dir).
    """
    sock = os.path.join(workdir, "csi.sock")
    log_path = os.path.join(workdir, "driver.log")
    config = write_config(workdir, data_path, backends)
    cmd = [sys.executable, "-m", "csi_driver", "--endpoint", f"unix://{sock}",
           "--node-id", "bench", "--config", config, "--log-level", "INFO"]
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        # Own session: a Ctrl-C reaches only the benchmark, which then cleans up through the
        # still-running driver and stops it with SIGTERM itself.
        proc = subprocess.Popen(cmd, cwd=source, stdout=log, stderr=subprocess.STDOUT,
                                # The bench stages and publishes under its workdir.
                                env={**os.environ, "PYTHONUNBUFFERED": "1",
                                     "BERTH_KUBELET_DIR": os.path.realpath(workdir)},
                                start_new_session=True, preexec_fn=_die_with_parent)
    socket_ms = -1.0
    for _ in range(int(START_TIMEOUT_S / POLL_INTERVAL_S)):
        if proc.poll() is not None:
            with open(log_path, errors="replace") as f:
                raise DriverError(f"driver exited with {proc.returncode} at start:\n{f.read()}")
        if os.path.exists(sock):
            if socket_ms < 0:
                socket_ms = (time.perf_counter() - t0) * 1000
            if get_plugin_info_once(sock, timeout=1.0):
                startup_ms = (time.perf_counter() - t0) * 1000
                return DriverProcess(proc, sock, log_path, startup_ms, socket_ms)
        time.sleep(POLL_INTERVAL_S)
    proc.kill()
    proc.wait(10)
    raise DriverError(f"driver did not answer GetPluginInfo within {START_TIMEOUT_S:.0f}s")


def status_kib(pid: int, field: str) -> int | None:
    """A `field:  N kB` value from /proc/PID/status, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class RssSampler:
    """Samples VmRSS in a background thread; VmHWM at the end catches peaks between samples."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        for _ in range(RSS_MAX_SAMPLES):
            rss = status_kib(self.pid, "VmRSS")
            if rss is not None:
                self.peak_kib = max(self.peak_kib, rss)
                self.samples += 1
            if self._stop.wait(RSS_INTERVAL_S):
                return

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
