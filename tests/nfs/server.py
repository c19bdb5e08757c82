"""Start and stop a real NFS-Ganesha server (NFSv3 and v4) in a network namespace of our own.

Ganesha and rpcbind run in a namespace this module creates, so rpcbind's port 111 and Ganesha's
2049 never touch the machine's own network. The namespace's `lo` carries 127.0.0.1 and the
server address ADDRESS (glibc's resolver wants a non-loopback address, and a User-Mode Linux guest
reaches the server at ADDRESS through its TAP device). Processes that must reach the server (the
driver under test, nfs-ls) run inside the namespace through `in_netns`.

rpcbind gets a private /run (a tmpfs in a mount namespace that Ganesha joins), so two servers on
one machine do not fight over its socket and lock file, and Ganesha restarts find it again.

Tests change files behind Ganesha's back (straight on its disk), so it caches no attributes.

Exports:
  /export  read-write, no root squash: volumes live here
  /denied  every client squashed to nobody, root-owned 0755: writes get EACCES (PERMISSION_DENIED)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

ADDRESS = "10.99.0.1"
SILENT_ADDRESS = "10.99.2.2"
PACKAGES = {"ganesha.nfsd": "nfs-ganesha", "rpcbind": "rpcbind", "nfs-ls": "libnfs-utils"}
VFS_FSAL = "/usr/lib/x86_64-linux-gnu/ganesha/libfsalvfs.so"

CONFIG = """\
NFS_CORE_PARAM {{ NFS_Port = 2049; MNT_Port = 20048; Protocols = 3, 4; Enable_NLM = false;
                 Enable_RQUOTA = false; Enable_UDP = false; Mount_Path_Pseudo = true; }}
NFSV4 {{ Graceless = true; RecoveryBackend = fs; RecoveryRoot = {base}/recov;
        Only_Numeric_Owners = true; Lease_Lifetime = 10; }}
NFS_KRB5 {{ Active_krb5 = false; }}
EXPORT {{ Export_Id = 1; Path = {base}/export; Pseudo = /export; Protocols = 3, 4;
         Transports = TCP; Access_Type = RW; Squash = No_Root_Squash; SecType = sys;
         Attr_Expiration_Time = 0; FSAL {{ Name = VFS; }} }}
EXPORT {{ Export_Id = 2; Path = {base}/denied; Pseudo = /denied; Protocols = 3, 4;
         Transports = TCP; Access_Type = RW; Squash = All_Squash; Anonymous_Uid = 65534;
         Anonymous_Gid = 65534; SecType = sys; Attr_Expiration_Time = 0;
         FSAL {{ Name = VFS; }} }}
LOG {{ Default_Log_Level = EVENT; }}
"""


class NfsServerError(RuntimeError):
    pass


def missing_packages() -> list[str]:
    missing = {pkg for tool, pkg in PACKAGES.items() if shutil.which(tool) is None}
    if not os.path.exists(VFS_FSAL):
        missing.add("nfs-ganesha-vfs")
    return sorted(missing)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, timeout=30, capture_output=True)


@dataclass
class NfsServer:
    base: Path
    netns: str
    address: str = ADDRESS
    ganesha: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    rpcbind: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def export_dir(self) -> Path:
        """The exported directory as the server's own filesystem sees it."""
        return self.base / "export"

    def in_netns(self, argv: list[str]) -> list[str]:
        """`argv` prefixed so that it runs inside the server's network namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def url(self, share: str = "/export", version: int = 3) -> str:
        return f"nfs://{self.address}{share}?version={version}"

    def answers(self, version: int = 4) -> bool:
        done = subprocess.run(self.in_netns(["nfs-ls", self.url(version=version)]),
                              capture_output=True, timeout=20, check=False)
        return done.returncode == 0

    def _start_rpcbind(self) -> int:
        if self.rpcbind is None or self.rpcbind.poll() is not None:
            script = "mount -t tmpfs berth-run /run && exec rpcbind -f -w"
            self.rpcbind = subprocess.Popen(
                # The parent-death signal ends it with the test process, however that ends.
                ["setpriv", "--pdeathsig", "KILL", *self.in_netns(
                    ["unshare", "--mount", "--propagation", "private", "sh", "-c", script])],
                stdout=subprocess.DEVNULL, stderr=open(self.base / "rpcbind.err", "ab"),  # noqa: SIM115
                start_new_session=True,
            )
        # setpriv, ip, unshare and sh all exec: the Popen becomes rpcbind once they are done.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.rpcbind.poll() is not None:
                raise NfsServerError(f"rpcbind exited with {self.rpcbind.returncode}: "
                                     f"{(self.base / 'rpcbind.err').read_text()}")
            with open(f"/proc/{self.rpcbind.pid}/comm") as f:
                if f.read().strip() == "rpcbind":
                    return self.rpcbind.pid
            time.sleep(0.01)
        raise NfsServerError("rpcbind did not start")

    def start(self, timeout: float = 20.0) -> None:
        """Start Ganesha (rpcbind once, first), and wait until it answers over v3 and v4."""
        if self.ganesha is not None and self.ganesha.poll() is None:
            return
        pid = self._start_rpcbind()
        # -F: foreground, so the Popen is Ganesha itself and `stop` can wait for it.
        self.ganesha = subprocess.Popen(
            ["setpriv", "--pdeathsig", "KILL", "nsenter", f"--target={pid}", "--mount", "--net",
             "ganesha.nfsd", "-F", "-f", f"{self.base}/ganesha.conf",
             "-L", f"{self.base}/ganesha.log", "-p", f"{self.base}/ganesha.pid"],
            stdout=subprocess.DEVNULL, stderr=open(self.base / "start.err", "ab"),  # noqa: SIM115
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ganesha.poll() is not None:
                raise NfsServerError(f"ganesha exited with {self.ganesha.returncode}:\n"
                                     f"{self.log_tail()}")
            if self.answers(4) and self.answers(3):
                return
            time.sleep(0.05)
        raise NfsServerError(f"ganesha did not answer within {timeout}s:\n{self.log_tail()}")

    def stop_ganesha(self) -> None:
        """Stop Ganesha only (rpcbind stays): the server is down, clients see no answer."""
        if self.ganesha is None:
            return
        if self.ganesha.poll() is None:
            self.ganesha.send_signal(signal.SIGTERM)
            try:
                self.ganesha.wait(15)
            except subprocess.TimeoutExpired:
                self.ganesha.kill()
                self.ganesha.wait(15)
        self.ganesha = None

    def restart(self) -> None:
        self.stop_ganesha()
        self.start()

    def stop(self) -> None:
        """Stop everything and remove the namespace (processes started in it included)."""
        self.stop_ganesha()
        pids = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True,
                              text=True, check=False, timeout=30).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "delete", self.netns], check=False, timeout=30,
                       capture_output=True)

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for name in ("start.err", "ganesha.log"):
            path = self.base / name
            if path.exists():
                out.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-lines:]))
        return "\n".join(out)


def start_server(base: Path, netns: str | None = None) -> NfsServer:
    """Create the namespace, write the config and start the server under `base`."""
    missing = missing_packages()
    if missing:
        raise NfsServerError(f"packages missing: {' '.join(missing)} (run scripts/install-nfs)")
    netns = netns or f"berth-nfs-{os.getpid()}"
    subprocess.run(["ip", "netns", "delete", netns], check=False, capture_output=True)
    _ip("netns", "add", netns)
    server = NfsServer(base, netns)
    try:
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "addr", "add", f"{ADDRESS}/32", "dev", "lo")
        # A link where nobody answers: the peer of a veth pair has no address, and a static
        # neighbour entry sends SILENT_ADDRESS's packets into it, so they vanish. A server that
        # is down hard (packets dropped), not one that refuses connections.
        _ip("-n", netns, "link", "add", "silent0", "type", "veth", "peer", "name", "silent1")
        _ip("-n", netns, "addr", "add", "10.99.2.1/24", "dev", "silent0")
        _ip("-n", netns, "link", "set", "silent0", "up")
        _ip("-n", netns, "link", "set", "silent1", "up")
        _ip("-n", netns, "neigh", "add", SILENT_ADDRESS, "lladdr", "02:00:00:00:00:02",
            "dev", "silent0")
        for sub in ("export", "denied", "recov"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "denied").chmod(0o755)
        (base / "ganesha.conf").write_text(CONFIG.format(base=base))
        server.start()
    except BaseException:
        server.stop()
        raise
    return server
