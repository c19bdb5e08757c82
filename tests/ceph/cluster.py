"""Start and stop a real, throw-away, single-node Ceph cluster for tests.

One monitor, one OSD (BlueStore in a sparse file) and, only when asked, one manager: librbd needs
no manager. cephx is on, every daemon binds 127.0.0.1 only, and every path the cluster uses
(config, keyrings, data, run dir, logs, pid files, daemon admin sockets) is under one directory.

The daemons run in the foreground as children of this process (so `stop()` can wait for them),
in their own session (a Ctrl-C reaches the tests, which then stop them in order), and they get
SIGTERM if the thread that started them dies. Their pids are also written to `run/pids`, so
`kill_leftovers()` can end a cluster whose owner died some other way.

Every `ceph`/`rbd` command gets a connect timeout and a subprocess timeout, and start-up has an
overall deadline: nothing here can hang for ever.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
MON_ID, OSD_ID, MGR_ID = "a", 0, "x"
CSI_USER = "csi"
# The OSD (and mgr) bind in this range; the monitor's two ports are chosen outside it.
OSD_PORT_MIN, OSD_PORT_MAX = 6800, 7300
# Mon ports are drawn from below the kernel's ephemeral range, so that no outgoing connection can
# take one between our check and the monitor's bind.
_MON_PORT_LOW, _MON_PORT_HIGH = 20000, 32000
# Paths of unix sockets are limited to 107 bytes.
_SUN_PATH_MAX = 107

# A missing executable or module names the Debian package that provides it.
TOOL_PACKAGES = {
    "ceph-mon": "ceph-mon",
    "ceph-osd": "ceph-osd",
    "ceph": "ceph-common",
    "rbd": "ceph-common",
    "ceph-authtool": "ceph-common",
    "monmaptool": "ceph-common",
}
MODULE_PACKAGES = {"rados": "python3-rados", "rbd": "python3-rbd"}

# Options for a librados/librbd client (a `conf=` dict or ceph.conf lines) that bound how long a
# client can block: connecting/authenticating, a monitor command, an OSD operation (seconds).
CLIENT_TIMEOUT_KEYS = ("client_mount_timeout", "rados_mon_op_timeout", "rados_osd_op_timeout")


class CephError(RuntimeError):
    """A cluster command failed, or the cluster did not come up in time."""


def missing_packages(*, mgr: bool = False, python: bool = True) -> list[str]:
    """The Debian packages still to install to run the cluster (and, with `python`, its
    librados/librbd Python bindings)."""
    missing = {pkg for tool, pkg in TOOL_PACKAGES.items() if shutil.which(tool) is None}
    if mgr and shutil.which("ceph-mgr") is None:
        missing.add("ceph-mgr")
    if python:
        missing |= {
            pkg for mod, pkg in MODULE_PACKAGES.items() if importlib.util.find_spec(mod) is None
        }
    return sorted(missing)


def port_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether a TCP listener could bind host:port now (also false while in TIME_WAIT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pick_mon_ports(rng: random.Random | None = None) -> tuple[int, int]:
    """Two free adjacent ports (msgr2, msgr1) for the monitor."""
    rng = rng or random.Random()
    high = _MON_PORT_HIGH
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        if ephemeral_low > _MON_PORT_LOW + 1000:
            high = min(high, ephemeral_low - 1)
    except (OSError, ValueError, IndexError):
        pass
    for _ in range(200):
        port = rng.randrange(_MON_PORT_LOW, high)
        if port_free(port) and port_free(port + 1):
            return port, port + 1
    raise CephError(f"found no two free adjacent ports in {_MON_PORT_LOW}-{high}")


def _clean_env() -> dict[str, str]:
    """This process's environment without CEPH_ARGS/CEPH_CONF/...: they would change every call."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CEPH_")}


def _run(argv: list[str], timeout: float) -> str:
    """Run a command to completion within `timeout` seconds; its stdout, or CephError."""
    timeout = max(timeout, 1.0)
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
            env=_clean_env(), check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CephError(f"{shlex.join(argv)}: no answer in {timeout:.0f} s") from exc
    if done.returncode != 0:
        err = (done.stderr or done.stdout).decode(errors="replace").strip()
        raise CephError(f"{shlex.join(argv)} exited {done.returncode}: {err[-2000:]}")
    return done.stdout.decode(errors="replace")


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the thread that started us ends, so a test
    run that is killed outright leaves no daemon behind."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


@dataclass
class CephCluster:
    """A running single-node cluster. `conf` + `admin_keyring` give `client.admin`;
    `csi_user`/`csi_key` is the restricted user the driver should use (rbd profile on `pool`)."""

    base: Path
    conf: Path
    admin_keyring: Path
    pool: str
    fsid: str
    #: The monitor's addresses in `mon host` form: "[v2:127.0.0.1:P2,v1:127.0.0.1:P1]".
    monitors: str
    #: (msgr2 port, msgr1 port) of the monitor.
    mon_ports: tuple[int, int]
    csi_user: str = CSI_USER
    csi_key: str = ""
    #: A keyring holding only client.csi (ceph.conf points [client.csi] at it).
    csi_keyring: Path = Path()
    mgr: bool = False
    #: Seconds each start-up step took (for reports).
    timings: dict[str, float] = field(default_factory=dict)
    #: Exit codes of the daemons after stop().
    exit_codes: dict[str, int] = field(default_factory=dict)
    _daemons: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    # --- commands --------------------------------------------------------------------------

    def ceph(self, *args: str, timeout: float = 60.0) -> str:
        """Run `ceph ARGS` as client.admin; its stdout. Bounded by `timeout` seconds."""
        connect = max(int(timeout) - 5, 1)
        return _run(
            ["ceph", "--conf", str(self.conf), "--name", "client.admin",
             "--keyring", str(self.admin_keyring), "--connect-timeout", str(connect), *args],
            timeout,
        )

    def ceph_json(self, *args: str, timeout: float = 60.0) -> Any:
        """Run `ceph ARGS --format json` as client.admin; the decoded output."""
        return json.loads(self.ceph(*args, "--format", "json", timeout=timeout))

    def rbd(self, *args: str, timeout: float = 60.0) -> str:
        """Run `rbd ARGS` as client.admin; its stdout. Bounded by `timeout` seconds."""
        limit = str(max(int(timeout) - 5, 1))
        return _run(
            ["rbd", "--conf", str(self.conf), "--name", "client.admin",
             "--keyring", str(self.admin_keyring),
             "--client_mount_timeout", limit, "--rados_mon_op_timeout", limit,
             "--rados_osd_op_timeout", limit, *args],
            timeout,
        )

    def admin_key(self) -> str:
        """client.admin's secret key, read from the admin keyring."""
        for line in self.admin_keyring.read_text().splitlines():
            name, _, value = line.partition("=")
            if name.strip() == "key":
                return value.strip()
        raise CephError(f"no key in {self.admin_keyring}")

    def client_conf(self, key: str | None = None, timeout: int = 10) -> dict[str, str]:
        """Options for `rados.Rados(rados_id=csi_user, conf=...)` without any conf file: the
        monitors, the key (csi's unless given) and bounded timeouts (seconds)."""
        conf = {"mon_host": self.monitors, "key": self.csi_key if key is None else key}
        conf.update({k: str(timeout) for k in CLIENT_TIMEOUT_KEYS})
        return conf

    # --- state -----------------------------------------------------------------------------

    def running(self) -> dict[str, bool]:
        """Each started daemon, and whether its process is still alive."""
        return {name: proc.poll() is None for name, proc in self._daemons.items()}

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of each daemon's log and captured output, for error messages."""
        parts = []
        for log in sorted((self.base / "log").glob("*")):
            if log.is_file() and (log.suffix in (".log", ".out")):
                text = _tail(log, lines)
                if text:
                    parts.append(f"--- {log.name} (last {lines} lines) ---\n{text}")
        return "\n".join(parts)

    # --- life cycle ------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> None:
        with (self.base / "log" / f"{name}.out").open("ab") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=_clean_env(), start_new_session=True, preexec_fn=_die_with_parent,
            )
        self._daemons[name] = proc
        with (self.base / "run" / "pids").open("a") as pids:
            pids.write(f"{name} {proc.pid}\n")

    def _check_alive(self, name: str) -> None:
        proc = self._daemons[name]
        if proc.poll() is not None:
            raise CephError(f"{name} exited with status {proc.returncode}")

    def stop(self, purge: bool = False, grace: float = 20.0) -> None:
        """Stop the daemons, newest first: SIGTERM, then SIGKILL after `grace` seconds each.
        The directory (data, logs) stays unless `purge`."""
        for name, proc in reversed(list(self._daemons.items())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=30)
            self.exit_codes[name] = proc.returncode
        self._daemons.clear()
        (self.base / "run" / "pids").unlink(missing_ok=True)
        if purge:
            shutil.rmtree(self.base, ignore_errors=True)


def kill_leftovers(base: Path, grace: float = 20.0) -> list[int]:
    """End the daemons recorded in BASE/run/pids by a cluster whose owner died (only processes
    whose command line names BASE's ceph.conf). The pids signalled."""
    pids_file = base / "run" / "pids"
    conf = str(base / "ceph.conf").encode()
    killed = []
    try:
        lines = pids_file.read_text().splitlines()
    except OSError:
        return []
    for line in reversed(lines):
        try:
            pid = int(line.split()[1])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (IndexError, ValueError, OSError):
            continue
        if conf not in cmdline.split(b"\0"):
            continue
        os.kill(pid, signal.SIGTERM)
        killed.append(pid)
        deadline = time.monotonic() + grace
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
    pids_file.unlink(missing_ok=True)
    return killed


def _config(base: Path, fsid: str, monitors: str, osd_size_gib: int, mgr: bool) -> str:
    run, log = base / "run", base / "log"
    # Without a mgr the mon turns HEALTH_WARN ("no active mgr") 120 s after its mkfs: not here.
    mgr_grace = "" if mgr else "mon mgr mkfs grace = 315360000\n"
    # Admin sockets only for the daemons, and only where the path fits a unix socket.
    asok = f"{run}/$cluster-$name.asok"
    daemon_asok = asok if len(str(run)) + len("/ceph-osd.0.asok") <= _SUN_PATH_MAX else ""
    return f"""\
# Single-node test cluster written by tests/ceph/cluster.py. Loopback only.
[global]
fsid = {fsid}
mon host = {monitors}
mon initial members = {MON_ID}
public addr = {LOOPBACK}
cluster addr = {LOOPBACK}
ms bind ipv4 = true
ms bind ipv6 = false
ms bind port min = {OSD_PORT_MIN}
ms bind port max = {OSD_PORT_MAX}
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
run dir = {run}
pid file = {run}/$cluster-$name.pid
crash dir = {log}/crash
log to stderr = false
err to stderr = false
log to syslog = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# Commit monitor changes (osdmap, auth) sooner than the 1 s default: faster start-up.
paxos propose interval = 0.1
# The disks of test machines may be well filled: do not warn about the mon's store.
mon data avail warn = 2
mon data avail crit = 1
mgr initial modules = iostat
{mgr_grace}
[mon]
mon data = {base}/mon/$cluster-$id
mon cluster log file = {log}/$cluster.log
log file = {log}/$cluster-$name.log
admin socket = {daemon_asok}

[mgr]
mgr data = {base}/mgr/$cluster-$id
# Usage statistics (ceph df, pool stats) a second after a write instead of 5 s.
mgr stats period = 1
keyring = {base}/mgr/$cluster-$id/keyring
log file = {log}/$cluster-$name.log
admin socket = {daemon_asok}

[osd]
osd data = {base}/osd/$cluster-$id
keyring = {base}/osd/$cluster-$id/keyring
log file = {log}/$cluster-$name.log
admin socket = {daemon_asok}
osd op num shards = 1
osd op num threads per shard = 2
osd objectstore = bluestore
bluestore block path = {base}/osd/$cluster-$id/block.file
bluestore block create = true
bluestore block size = {osd_size_gib * 1024**3}
bluestore fsck on mkfs = false
bluestore fsck on mount = false
bluestore cache autotune = false
bluestore cache size = 128M
osd memory target = 1G

[client]
# client.admin -> ceph.client.admin.keyring, client.csi -> ceph.client.csi.keyring
keyring = {base}/$cluster.$name.keyring
log file = {log}/$cluster-$name.log
admin socket =
"""


def start_cluster(
    base: Path,
    pool: str = "rbd",
    ports: tuple[int, int] | None = None,
    *,
    mgr: bool = False,
    osd_size_gib: int = 10,
    timeout: float = 120.0,
) -> CephCluster:
    """Start a cluster in BASE (which must be empty or absent) and return it, ready: pool POOL
    (size 1, `rbd pool init`-ed), clone v2 allowed, and user client.csi with the rbd profile on
    POOL. `ports` are the monitor's (msgr2, msgr1) ports, refused if taken; by default two free
    ones are chosen. Raises CephError, with the tail of the daemons' logs, if the cluster is not
    usable within `timeout` seconds; the daemons started so far are stopped then."""
    missing = missing_packages(mgr=mgr, python=False)
    if missing:
        raise CephError(
            "Ceph is not installed: run scripts/install-ceph "
            f"(apt-get install --no-install-recommends {' '.join(missing)})")
    if ports is None:
        ports = pick_mon_ports()
    busy = [p for p in ports if not port_free(p)]
    if busy:
        raise CephError(f"monitor port(s) {busy} on {LOOPBACK} are taken: refusing to start")
    base = base.resolve()
    if base.exists() and any(base.iterdir()):
        raise CephError(f"{base} is not empty: a cluster needs a fresh directory")

    t0 = time.monotonic()
    deadline = t0 + timeout
    v2, v1 = ports
    monitors = f"[v2:{LOOPBACK}:{v2},v1:{LOOPBACK}:{v1}]"
    cluster = CephCluster(
        base=base, conf=base / "ceph.conf", admin_keyring=base / "ceph.client.admin.keyring",
        pool=pool, fsid=str(uuid.uuid4()), monitors=monitors, mon_ports=ports,
        csi_keyring=base / f"ceph.client.{CSI_USER}.keyring", mgr=mgr,
    )
    step_start = t0

    def step(name: str) -> None:
        nonlocal step_start
        now = time.monotonic()
        cluster.timings[name] = round(now - step_start, 3)
        step_start = now

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CephError(f"cluster not ready within {timeout:.0f} s")
        return remaining

    try:
        _bootstrap(cluster, osd_size_gib, left, step)
    except BaseException as exc:
        cluster.stop()
        if isinstance(exc, CephError | subprocess.SubprocessError | OSError):
            raise CephError(
                f"Ceph test cluster in {base} failed to start: {exc}\n{cluster.log_tail()}"
            ) from exc
        raise
    cluster.timings["total"] = round(time.monotonic() - t0, 3)
    return cluster


def _wait(what: str, probe: Any, left: Any, daemon: str, cluster: CephCluster) -> None:
    """Call probe() until it returns true, while `daemon` lives and time is left."""
    while True:
        cluster._check_alive(daemon)
        try:
            if probe():
                return
        except CephError:
            pass
        if left() < 0.5:
            raise CephError(f"timed out waiting for {what}")
        time.sleep(0.25)


def _bootstrap(cluster: CephCluster, osd_size_gib: int, left: Any, step: Any) -> None:
    base, conf = cluster.base, str(cluster.conf)
    for sub in ("run", "log", f"mon/ceph-{MON_ID}", f"osd/ceph-{OSD_ID}"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    cluster.conf.write_text(
        _config(base, cluster.fsid, cluster.monitors, osd_size_gib, cluster.mgr))

    # Keys: the monitor's keyring also holds client.admin, so the mon knows the admin.
    mon_keyring = base / "mon.keyring"
    _run(["ceph-authtool", "--create-keyring", str(mon_keyring), "--gen-key", "-n", "mon.",
          "--cap", "mon", "allow *"], left())
    _run(["ceph-authtool", "--create-keyring", str(cluster.admin_keyring), "--gen-key",
          "-n", "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *",
          "--cap", "mds", "allow *", "--cap", "mgr", "allow *"], left())
    os.chmod(cluster.admin_keyring, 0o600)
    _run(["ceph-authtool", str(mon_keyring), "--import-keyring", str(cluster.admin_keyring)],
         left())
    monmap = base / "monmap"
    _run(["monmaptool", "--create", "--fsid", cluster.fsid, "--addv", MON_ID, cluster.monitors,
          str(monmap)], left())
    _run(["ceph-mon", "-c", conf, "--mkfs", "-i", MON_ID, "--monmap", str(monmap),
          "--keyring", str(mon_keyring)], left())
    step("mon mkfs")

    cluster._spawn(f"mon.{MON_ID}", ["ceph-mon", "-c", conf, "-i", MON_ID, "-f"])
    _wait("the monitor to answer",
          lambda: cluster.ceph("mon", "stat", timeout=min(left(), 10)) is not None,
          left, f"mon.{MON_ID}", cluster)
    step("mon up")

    if cluster.mgr:
        (base / f"mgr/ceph-{MGR_ID}").mkdir(parents=True, exist_ok=True)
        cluster.ceph("auth", "get-or-create", f"mgr.{MGR_ID}", "mon", "allow profile mgr",
                     "osd", "allow *", "mds", "allow *",
                     "-o", str(base / f"mgr/ceph-{MGR_ID}/keyring"), timeout=left())
        cluster._spawn(f"mgr.{MGR_ID}", ["ceph-mgr", "-c", conf, "-i", MGR_ID, "-f"])
        step("mgr started")

    osd_dir = base / f"osd/ceph-{OSD_ID}"
    osd_keyring = osd_dir / "keyring"
    _run(["ceph-authtool", "--create-keyring", str(osd_keyring), "--gen-key",
          "-n", f"osd.{OSD_ID}"], left())
    osd_key = _run(["ceph-authtool", str(osd_keyring), "-n", f"osd.{OSD_ID}", "-p"],
                   left()).strip()
    secret = osd_dir / "new.json"
    _write_private(secret, json.dumps({"cephx_secret": osd_key}))
    osd_uuid = str(uuid.uuid4())
    got = cluster.ceph("osd", "new", osd_uuid, "-i", str(secret), timeout=left()).strip()
    secret.unlink()
    if got != str(OSD_ID):
        raise CephError(f"`ceph osd new` gave id {got!r}, expected {OSD_ID}")
    _run(["ceph-osd", "-c", conf, "-i", str(OSD_ID), "--mkfs", "--osd-uuid", osd_uuid], left())
    step("osd mkfs")
    cluster._spawn(f"osd.{OSD_ID}", ["ceph-osd", "-c", conf, "-i", str(OSD_ID), "-f"])

    def osd_up() -> bool:
        dump = cluster.ceph_json("osd", "dump", timeout=min(left(), 10))
        return any(o["osd"] == OSD_ID and o["up"] == 1 and o["in"] == 1 for o in dump["osds"])

    _wait(f"osd.{OSD_ID} to be up and in", osd_up, left, f"osd.{OSD_ID}", cluster)
    step("osd up")

    # Clone v2: `rbd clone` without `snap protect`, as ceph-csi expects.
    cluster.ceph("osd", "set-require-min-compat-client", "mimic", timeout=left())
    pool = cluster.pool
    cluster.ceph("osd", "pool", "create", pool, "8", "8", "replicated", timeout=left())
    cluster.ceph("osd", "pool", "set", pool, "size", "1", "--yes-i-really-mean-it",
                 timeout=left())
    # Writes its first object, so this also waits until the pool's PGs are active.
    cluster.rbd("pool", "init", pool, timeout=left())
    step("pool ready")

    caps = ["mon", "profile rbd", "osd", f"profile rbd pool={pool}"]
    if cluster.mgr:
        caps += ["mgr", f"profile rbd pool={pool}"]
    cluster.ceph("auth", "get-or-create", f"client.{CSI_USER}", *caps,
                 "-o", str(cluster.csi_keyring), timeout=left())
    os.chmod(cluster.csi_keyring, 0o600)
    cluster.csi_key = cluster.ceph("auth", "print-key", f"client.{CSI_USER}",
                                   timeout=left()).strip()
    step("csi user")

    if cluster.mgr:
        def stats_ready() -> bool:
            # The mgr knows every PG, all active (so pool statistics exist), and health is OK.
            pgs = cluster.ceph_json("pg", "stat", timeout=min(left(), 10))["pg_summary"]
            states = pgs["num_pg_by_state"]
            return bool(
                pgs["num_pgs"] > 0
                and all("active" in s["name"].split("+") for s in states)
                and cluster.ceph_json("health", timeout=min(left(), 10))["status"] == "HEALTH_OK")

        _wait("the mgr's PG statistics and HEALTH_OK", stats_ready, left, f"mgr.{MGR_ID}", cluster)
        step("mgr stats, health ok")
