"""The inside of the User-Mode Linux guest that tests/nfs/guest.py boots. Standard library only:
it runs under the host's interpreter, seen through the guest's hostfs root.

  guest_agent.py init SETUP.json   PID 1: makes the root writable, loads modules, sets up the
                                   network, starts the agent and the driver, then reaps orphans
  guest_agent.py serve PORT        the command agent: one JSON request line per connection,
                                   {"argv": [...], "timeout": s} or {"poweroff": true}; replies
                                   one JSON line {"rc", "stdout", "stderr", "timed_out"}
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import time
import traceback
from typing import Any

LIBC = ctypes.CDLL(None, use_errno=True)
SYS_FINIT_MODULE = 313  # x86_64 numbering, which UML's syscall table uses
RB_POWER_OFF = 0x4321FEDC
# The guest has no login shell to set PATH; mount needs /sbin for the mount.nfs helper.
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def sh(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: rc {done.returncode}: {done.stderr.strip()}")


def insmod(path: str) -> None:
    # The host has no kmod and the guest needs none: finit_module(2) is all insmod does.
    fd = os.open(path, os.O_RDONLY)
    try:
        if LIBC.syscall(SYS_FINIT_MODULE, fd, b"", 0) != 0:
            err = ctypes.get_errno()
            if err != 17:  # EEXIST: already loaded
                raise OSError(err, f"finit_module {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def power_off() -> None:
    os.sync()
    LIBC.reboot(RB_POWER_OFF)


def writable_root() -> None:
    """Lay a tmpfs-backed overlay over the read-only hostfs root and move into it: the guest
    can write anywhere (host paths such as a test's config under /tmp stay visible), and every
    write lands in guest memory, never on the host."""
    sh("mount", "-t", "proc", "proc", "/proc")
    sh("mount", "-t", "tmpfs", "-o", "mode=0755", "ovl", "/run")
    for sub in ("upper", "work", "root"):
        os.mkdir(f"/run/{sub}")
    sh("mount", "-t", "overlay", "overlay", "-o",
       "lowerdir=/,upperdir=/run/upper,workdir=/run/work", "/run/root")
    os.chdir("/run/root")
    sh("mount", "--move", ".", "/")
    os.chroot(".")
    os.chdir("/")


def init(setup_path: str) -> None:
    with open(setup_path) as f:
        setup: dict[str, Any] = json.load(f)
    os.environ.update(PATH=PATH, HOME="/root", PYTHONUNBUFFERED="1", BERTH_KUBELET_DIR="/mnt")
    insmod(setup["overlay_module"])
    writable_root()
    for fs, where in (("proc", "/proc"), ("sysfs", "/sys"), ("devtmpfs", "/dev"),
                      ("tmpfs", "/run"), ("tmpfs", "/mnt"), ("tmpfs", "/var/lib/berth")):
        os.makedirs(where, exist_ok=True)
        sh("mount", "-t", fs, fs, where)
    for module in setup["modules"]:
        insmod(module)
    socket.sethostname(setup["hostname"])
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "addr", "add", setup["address"], "dev", "vec0")
    sh("ip", "link", "set", "vec0", "up")
    sh("ip", "route", "add", "default", "via", setup["gateway"])
    # The one host folder the guest may write: logs the host reads.
    os.makedirs("/run/out")
    sh("mount", "-t", "hostfs", "none", "/run/out", "-o", setup["out_dir"])
    pids = {}
    for name, argv in (("agent", [sys.executable, os.path.abspath(__file__), "serve",
                                  str(setup["agent_port"])]),
                       ("driver", setup["driver_argv"])):
        with open(f"/run/out/{name}.log", "ab") as log:
            pids[subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, cwd="/").pid] = name
    print("berth-guest: up", flush=True)
    while True:  # PID 1 adopts orphans: reap them, or they pile up as zombies.
        try:
            pid, status = os.wait()
        except ChildProcessError:
            time.sleep(1)
            continue
        if pid in pids:  # guest.py watches the console for this
            print(f"berth-guest: {pids[pid]} exited with {os.waitstatus_to_exitcode(status)}",
                  flush=True)


def run(argv: list[str], timeout: float) -> dict[str, Any]:
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, errors="replace",
                                start_new_session=True)
    except OSError as exc:
        return {"rc": 127, "stdout": "", "stderr": f"{argv[0]}: {exc}", "timed_out": False}
    try:
        out, err = proc.communicate(timeout=timeout)
        return {"rc": proc.returncode, "stdout": out, "stderr": err, "timed_out": False}
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    try:  # A process stuck in an unkillable wait (an NFS call) may never end: do not wait for it.
        out, err = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        out, err = "", "berth-guest: still running 5 s after SIGKILL"
    return {"rc": proc.returncode, "stdout": out, "stderr": err, "timed_out": True}


class Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        request = json.loads(self.rfile.readline())
        if request.get("poweroff"):
            self.wfile.write(b'{"rc": 0}\n')
            self.wfile.flush()
            power_off()
            return
        reply = run([str(a) for a in request["argv"]], float(request.get("timeout", 30)))
        self.wfile.write(json.dumps(reply).encode() + b"\n")


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main() -> None:
    if sys.argv[1] == "serve":
        with Server(("0.0.0.0", int(sys.argv[2])), Handler) as server:
            server.serve_forever()
        return
    try:
        init(sys.argv[2])
    except BaseException:
        # PID 1 must not exit (the kernel would panic): report on the console and power off.
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        power_off()


if __name__ == "__main__":
    main()
