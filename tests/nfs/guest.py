"""A User-Mode Linux guest whose real kernel NFS client mounts the test NFS server, with the
driver's node service running inside it.

This host's kernel has no NFS client, so the node service cannot mount NFS here. UML is a whole
Linux kernel run as an ordinary process: the guest sees the host's `/` (through hostfs, read-only,
under a tmpfs overlay so the guest can write anywhere without touching the host), the host's
python and venv included. Its NIC is a TAP device in the server's network namespace; the guest
reaches the server's address through a default route via the TAP's host side.

The test process stays in the root network namespace and cannot reach the guest's address, so
socat relays running inside the namespace bridge unix sockets in `work` (unix sockets on the
filesystem work across network namespaces) to the guest: one for the driver's gRPC endpoint,
one for the command agent (guest_agent.py) behind `Guest.run`.

The guest writes on the host only in `work/out` (driver.log, agent.log); its console goes to
`work/console.log`. Needs root, and the packages scripts/install-nfs installs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from csi_driver.csi import csi_pb2 as pb
from csi_driver.csi import csi_pb2_grpc as pb_grpc

LINUX = Path("/usr/bin/linux.uml")  # Debian user-mode-linux
# Built by scripts/install-nfs: without it linux.uml 6.1 dies on AVX-512/AMX hosts.
XSTATE_SHIM = Path("/var/cache/berth-uml/uml-xstate.so")
MODULES = Path("/usr/lib/uml/modules")
# The NFS client is built as modules; overlay makes the hostfs root writable in guest memory.
WANTED = ("kernel/fs/overlayfs/overlay.ko", "kernel/fs/nfs/nfsv3.ko", "kernel/fs/nfs/nfsv4.ko",
          "kernel/drivers/block/loop.ko")
GUEST_ADDRESS, HOST_ADDRESS, PREFIX = "10.99.1.2", "10.99.1.1", 24
TAP = "berth-uml"
DRIVER_PORT, AGENT_PORT = 7001, 7002
AGENT = Path(__file__).with_name("guest_agent.py")
DRIVER_EXITED = "berth-guest: driver exited"  # the agent's init says so on the console


class GuestError(RuntimeError):
    pass


def missing() -> list[str]:
    """What scripts/install-nfs would install, of what the guest needs."""
    need = {"user-mode-linux": LINUX, "nfs-common": Path("/sbin/mount.nfs"),
            "the xstate shim": XSTATE_SHIM}
    absent = [name for name, path in need.items() if not path.exists()]
    return absent + ([] if shutil.which("socat") else ["socat"])


def _modules_in_load_order() -> tuple[str, list[str]]:
    """The overlay module, and the NFS client modules with their dependencies first."""
    releases = sorted(MODULES.iterdir())
    if len(releases) != 1:
        raise GuestError(f"expected one kernel release under {MODULES}: {releases}")
    root = releases[0]
    deps: dict[str, list[str]] = {}
    for line in (root / "modules.dep").read_text().splitlines():
        name, _, rest = line.partition(":")
        deps[name] = rest.split()
    order: list[str] = []
    for wanted in WANTED[1:]:
        # modules.dep lists all of a module's dependencies, each after those it needs itself.
        for mod in [*reversed(deps[wanted]), wanted]:
            if mod not in order:
                order.append(mod)
    return str(root / WANTED[0]), [str(root / m) for m in order]


def _netns(netns: str, argv: list[str]) -> list[str]:
    """`argv` in `netns`, in a PID namespace of its own under `unshare`, which dies with the
    test process (pdeathsig): the namespace's first process follows (--kill-child), and the kernel
    then kills the rest of the namespace, such as the host processes UML runs its guest's in."""
    return ["setpriv", "--pdeathsig", "KILL", "unshare", "--pid", "--fork",
            "--kill-child=SIGKILL", "ip", "netns", "exec", netns, *argv]


@dataclass
class Guest:
    work: Path
    netns: str
    uml: subprocess.Popen[bytes]
    relays: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def driver_socket(self) -> Path:
        """A unix socket on the host that reaches the driver in the guest (gRPC)."""
        return self.work / "csi.sock"

    @property
    def agent_socket(self) -> Path:
        return self.work / "agent.sock"

    def _ask(self, request: dict[str, object], timeout: float) -> dict[str, object]:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(timeout)
            conn.connect(str(self.agent_socket))
            conn.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n") and (chunk := conn.recv(65536)):
                data += chunk
        if not data.endswith(b"\n"):
            raise GuestError(f"the guest agent ended the connection without a reply ({data!r})")
        reply: dict[str, object] = json.loads(data)
        return reply

    def run(self, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the guest. Like subprocess.run: raises TimeoutExpired after
        `timeout` seconds (the agent has SIGKILLed the command's process group by then)."""
        # The agent gives up on a command 5 s after killing it: allow for that and the relay.
        reply = self._ask({"argv": argv, "timeout": timeout}, timeout + 15)
        out, err = str(reply["stdout"]), str(reply["stderr"])
        if reply["timed_out"]:
            raise subprocess.TimeoutExpired(argv, timeout, out, err)
        rc = reply["rc"]
        assert isinstance(rc, int)
        return subprocess.CompletedProcess(argv, rc, out, err)

    def driver_log(self) -> str:
        return _read(self.work / "out" / "driver.log")

    def console(self) -> str:
        return _read(self.work / "console.log")

    def stop(self) -> None:
        """Power the guest off (SIGKILL it if that takes over 5 s), end the relays, drop the
        TAP. Never hangs: hung NFS mounts inside the guest die with it."""
        if self.uml.poll() is None:
            with contextlib.suppress(OSError, ValueError, GuestError):
                self._ask({"poweroff": True}, 2)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.uml.wait(5)
        # Each in its own process group (and PID namespace): UML's host processes among them.
        for proc in [self.uml, *self.relays]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        subprocess.run(["ip", "-n", self.netns, "link", "delete", TAP], capture_output=True,
                       check=False, timeout=30)
        shutil.rmtree(self.work / "uml", ignore_errors=True)
        for sock in (self.driver_socket, self.agent_socket):
            sock.unlink(missing_ok=True)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def guest_python() -> list[str]:
    """The command that runs this checkout's python in the guest: the guest's processes start
    in `/`, where `-m csi_driver` would find the venv's installed (editable) package, which
    need not be this checkout's (a git worktree's, say)."""
    import csi_driver

    return ["env", f"PYTHONPATH={Path(csi_driver.__file__).resolve().parents[1]}",
            sys.executable]


def start_guest(work: Path, netns: str, driver_args: list[str], timeout: float = 60) -> Guest:
    """Boot a guest in `netns` (which must route to the NFS server, as NfsServer's does) with
    `python -m csi_driver *driver_args` running in it, and wait until driver and agent answer.
    One guest per namespace: the TAP name and addresses are fixed."""
    absent = missing()
    if absent:
        raise GuestError(f"missing: {', '.join(absent)} (run scripts/install-nfs)")
    work = work.resolve()
    (work / "out").mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "uml", ignore_errors=True)  # a stale pid file there stops UML
    (work / "uml").mkdir()
    if len(str(work / "agent.sock")) > 100:
        raise GuestError(f"{work}: too long a path for unix sockets")
    overlay, modules = _modules_in_load_order()
    setup = {
        "overlay_module": overlay, "modules": modules, "hostname": "berth-uml",
        "address": f"{GUEST_ADDRESS}/{PREFIX}", "gateway": HOST_ADDRESS,
        "out_dir": str(work / "out"), "agent_port": AGENT_PORT,
        "driver_argv": [*guest_python(), "-m", "csi_driver", *driver_args,
                        "--endpoint", f"tcp://0.0.0.0:{DRIVER_PORT}"],
    }
    (work / "setup.json").write_text(json.dumps(setup, indent=1))
    init = work / "init"
    init.write_text(f"#!/bin/sh\nexec {sys.executable} {AGENT} init {work / 'setup.json'}\n")
    init.chmod(0o755)

    subprocess.run(["ip", "-n", netns, "link", "delete", TAP], capture_output=True, check=False)
    for step in (["tuntap", "add", "dev", TAP, "mode", "tap"],
                 ["addr", "add", f"{HOST_ADDRESS}/{PREFIX}", "dev", TAP],
                 ["link", "set", TAP, "up"]):
        subprocess.run(["ip", "-n", netns, *step], check=True, capture_output=True, timeout=30)
    # mem: the driver and agent (two pythons with grpc) plus the overlay's tmpfs writes.
    cmdline = ["env", f"LD_PRELOAD={XSTATE_SHIM}", str(LINUX), "umid=berth",
               f"uml_dir={work / 'uml'}", "mem=384M", "root=/dev/root", "rootfstype=hostfs",
               "rootflags=/", "ro", f"init={init}",
               # gro=1: the host hands the TAP coalesced segments of up to 64 KiB; without
               # it the guest drops them and reads of more than a few KiB stall for minutes.
               f"vec0:transport=tap,ifname={TAP},gro=1", "con=null", "con0=null,fd:1", "ssl=null"]
    with open(work / "console.log", "wb") as console:
        uml = subprocess.Popen(_netns(netns, cmdline), stdin=subprocess.DEVNULL, stdout=console,
                               stderr=subprocess.STDOUT, start_new_session=True)
    guest = Guest(work, netns, uml)
    try:
        for sock, port in ((guest.driver_socket, DRIVER_PORT), (guest.agent_socket, AGENT_PORT)):
            guest.relays.append(subprocess.Popen(
                _netns(netns, ["socat", f"UNIX-LISTEN:{sock},fork,unlink-early",
                               f"TCP:{GUEST_ADDRESS}:{port}"]),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=open(work / "socat.log", "ab"),  # noqa: SIM115 - the child owns it
                start_new_session=True))
        _wait_ready(guest, timeout)
    except BaseException:
        guest.stop()
        raise
    return guest


def _wait_ready(guest: Guest, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    agent_ok = driver_ok = False
    # Short reconnect backoff: the relay refuses connections until the guest is up.
    options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 300)]
    with grpc.insecure_channel(f"unix://{guest.driver_socket}", options) as channel:
        identity = pb_grpc.IdentityStub(channel)  # type: ignore[no-untyped-call]
        while (time.monotonic() < deadline and guest.uml.poll() is None
               and DRIVER_EXITED not in guest.console()):
            if not agent_ok and guest.agent_socket.exists():
                with contextlib.suppress(OSError, ValueError, GuestError):
                    agent_ok = guest.run(["true"], timeout=5).returncode == 0
            if not driver_ok and guest.driver_socket.exists():
                with contextlib.suppress(grpc.RpcError):
                    identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=2)
                    driver_ok = True
            if agent_ok and driver_ok:
                return
            time.sleep(0.1)
    why = ("the guest exited" if guest.uml.poll() is not None else
           "the driver exited" if DRIVER_EXITED in guest.console() else
           f"not ready within {timeout}s (agent {agent_ok}, driver {driver_ok})")
    raise GuestError(f"{why}\n--- console\n{guest.console()[-6000:]}\n"
                     f"--- agent.log\n{_read(guest.work / 'out' / 'agent.log')[-3000:]}\n"
                     f"--- driver.log\n{guest.driver_log()[-3000:]}")
