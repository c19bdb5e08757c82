"""Keystone and Cinder from Debian's packages, on loopback, for the tests (and the bench).

Keystone 22 runs under uwsgi (one process, one thread: its sqlite and its in-memory token cache
want that) with Fernet tokens; Cinder 21 runs api + scheduler + one volume service per backend in
one process (cinder_launcher.py, `fake://` messaging) with Keystone auth (keystonemiddleware checks
every token for real) and its RBD driver on the session's Ceph: two backends, `ceph1` in zone az1
(pool `volumes`) and `ceph2` in az2 (pool `volumes2`). Services are started with /usr/bin/python3
(Debian's OpenStack packages are not in the venv's interpreter path when run as scripts), die with
the process that started them, and keep their data across restart() on the same ports.
See ../shared notes: cinder-keystone-rbd.md for what each setting is for.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FILES = Path(os.environ.get("OPENSTACK_FILES", "/var/lib/berth-test/openstack"))
PACKAGES = {"keystone-manage": "python3-keystone", "uwsgi": "uwsgi-core",
            "/usr/lib/uwsgi/plugins/python3_plugin.so": "uwsgi-plugin-python3",
            "/usr/lib/python3/dist-packages/cinder": "python3-cinder", "qemu-img": "qemu-utils"}
HERE = Path(__file__).parent
REGION = "RegionOne"
ADMIN_PASSWORD = "berth-admin-pw"
SERVICE_PASSWORD = "berth-cinder-pw"
USER_PASSWORD = "berth-csi-pw"
RBD_SECRET_UUID = "457eb676-33da-42ec-9a8c-9293d545c337"  # only echoed back to clients


def missing() -> list[str]:
    """Debian packages (or the unpacked files) the services need and this machine lacks."""
    lost = sorted({pkg for path, pkg in PACKAGES.items()
                   if not (os.path.exists(path) if path.startswith("/") else shutil.which(path))})
    if not (FILES / "cinder" / "api-paste.ini").exists():
        lost.append(f"the files scripts/install-openstack unpacks into {FILES}")
    return lost


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _run(argv: list[str], timeout: float = 120) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... exited {done.returncode}: "
                           f"{(done.stderr or done.stdout)[-2000:]}")


@dataclass
class Process:
    """A service process: started in its own session, killed with the test process."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", **self.env},
                start_new_session=True, preexec_fn=_die_with_parent)

    def pids(self) -> list[int]:
        """The process and its children (uwsgi's worker)."""
        if self.proc is None:
            return []
        found = [self.proc.pid]
        with contextlib.suppress(OSError, ValueError):
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
            found += [int(k) for k in kids.split()]
        return found

    def signal(self, sig: int) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.signal(signal.SIGCONT)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(15)
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _wait(what: str, probe: Any, proc: Process, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{what} exited:\n{proc.log.read_text()[-3000:]}")
        with contextlib.suppress(Exception):
            if probe():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s:\n{proc.log.read_text()[-3000:]}")


def uwsgi(port: int, wsgi_file: str) -> list[str]:
    """A WSGI app under uwsgi on loopback: one process, one thread (sqlite and in-memory caches
    want that)."""
    return ["/usr/bin/uwsgi", "--plugin", "python3", "--http-socket", f"127.0.0.1:{port}",
            # Clients reuse connections; plain http-socket would reset some of them.
            "--add-header", "Connection: close", "--wsgi-file", wsgi_file, "--master",
            "--processes", "1", "--threads", "1", "--die-on-term", "--need-app", "--lazy-apps",
            "--buffer-size", "65535"]


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return bool(resp.status < 400)


class Keystone:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v3"
        etc = base / "etc"
        for d in ("etc", "log", "fernet-keys", "credential-keys"):
            (base / d).mkdir(parents=True, exist_ok=True)
        (base / "fernet-keys").chmod(0o700)
        (base / "credential-keys").chmod(0o700)
        self.conf = etc / "keystone.conf"
        self.conf.write_text(f"""[DEFAULT]
log_file = {base}/log/keystone.log
use_stderr = false
[database]
connection = sqlite:///{base}/keystone.sqlite
[token]
provider = fernet
[fernet_tokens]
key_repository = {base}/fernet-keys
[credential]
key_repository = {base}/credential-keys
[cache]
# Without it every authenticated request costs ~220 ms (each validation rebuilds the token).
enabled = true
backend = dogpile.cache.memory
[identity]
# bcrypt at 4 rounds: a token in 9 ms instead of 215 ms (set before bootstrap makes users)
password_hash_rounds = 4
""")
        self.log = base / "log" / "keystone.log"
        self.process = Process("keystone", uwsgi(self.port, "/usr/bin/keystone-wsgi-public"),
                               base / "log" / "uwsgi.log",
                               env={"OS_KEYSTONE_CONFIG_DIR": str(etc)})

    def bootstrap(self) -> None:
        manage = ["keystone-manage", "--config-file", str(self.conf)]
        owner = ["--keystone-user", "root", "--keystone-group", "root"]
        _run([*manage, "fernet_setup", *owner])
        _run([*manage, "credential_setup", *owner])
        _run([*manage, "db_sync"])
        _run([*manage, "bootstrap", "--bootstrap-password", ADMIN_PASSWORD,
              *(f"--bootstrap-{kind}-url={self.url}" for kind in ("public", "internal", "admin")),
              "--bootstrap-region-id", REGION])

    def start(self) -> None:
        self.process.start()
        _wait("keystone", lambda: _http_ok(self.url), self.process)


class Cinder:
    def __init__(self, base: Path, keystone: Keystone, ceph_conf: Path) -> None:
        self.base = base
        self.port = free_port()
        etc = base / "etc"
        for d in ("etc", "log", "state/lock"):
            (base / d).mkdir(parents=True, exist_ok=True)
        for name in ("api-paste.ini", "resource_filters.json"):
            shutil.copy(FILES / "cinder" / name, etc / name)
        shutil.copytree(FILES / "cinder" / "rootwrap.d", etc / "rootwrap.d", dirs_exist_ok=True)
        rootwrap = (FILES / "cinder" / "rootwrap.conf").read_text()
        (etc / "rootwrap.conf").write_text("\n".join(
            f"filters_path={etc}/rootwrap.d" if line.startswith("filters_path") else line
            for line in rootwrap.splitlines()))
        backends = "".join(f"""
[{name}]
volume_driver = cinder.volume.drivers.rbd.RBDDriver
volume_backend_name = {name}
backend_availability_zone = {zone}
rbd_pool = {pool}
rbd_ceph_conf = {ceph_conf}
rbd_user = cinder
rbd_secret_uuid = {RBD_SECRET_UUID}
rados_connect_timeout = 10
""" for name, zone, pool in (("ceph1", "az1", "volumes"), ("ceph2", "az2", "volumes2")))
        self.conf = etc / "cinder.conf"
        self.conf.write_text(f"""[DEFAULT]
auth_strategy = keystone
transport_url = fake://
host = cinder-ci
my_ip = 127.0.0.1
state_path = {base}/state
log_dir = {base}/log
api_paste_config = {etc}/api-paste.ini
resource_query_filters_file = {etc}/resource_filters.json
rootwrap_config = {etc}/rootwrap.conf
osapi_volume_listen = 127.0.0.1
osapi_volume_listen_port = {self.port}
osapi_volume_workers = 1
enabled_backends = ceph1,ceph2
default_volume_type = ceph1
storage_availability_zone = az1
default_availability_zone = az1
report_interval = 5
service_down_time = 30
rpc_response_timeout = 30
[database]
connection = sqlite:///{base}/state/cinder.sqlite
[oslo_concurrency]
lock_path = {base}/state/lock
[keystone_authtoken]
www_authenticate_uri = {keystone.url}
auth_url = {keystone.url}
auth_type = password
username = cinder
password = {SERVICE_PASSWORD}
project_name = service
user_domain_name = Default
project_domain_name = Default
http_connect_timeout = 5
http_request_max_retries = 1
{backends}""")
        self.log = base / "log" / "cinder_launcher.log"
        self.process = Process("cinder", ["/usr/bin/python3", str(HERE / "cinder_launcher.py"),
                                          "--config-file", str(self.conf)],
                               base / "log" / "launcher.out")

    def db_sync(self) -> None:
        _run(["/usr/bin/python3", str(FILES / "cinder" / "cinder-manage"), "--config-file",
              str(self.conf), "db", "sync"])

    def start(self, admin: Any) -> None:
        """Start, and wait until the scheduler and both volume services are up and both pools
        are known (get_pools sent earlier is lost and hangs for rpc_response_timeout)."""
        self.process.start()
        bs = admin.block_storage

        def services_up() -> bool:
            up = {(s.binary, s.host) for s in bs.services() if s.state == "up"}
            return {("cinder-scheduler", "cinder-ci"), ("cinder-volume", "cinder-ci@ceph1"),
                    ("cinder-volume", "cinder-ci@ceph2")} <= up

        _wait("cinder services", services_up, self.process)
        _wait("cinder pools", lambda: len(list(bs.backend_pools())) >= 2, self.process)


@dataclass
class OpenStack:
    """What a test needs of the cloud: credentials, connections, and faults to inject."""

    keystone: Keystone
    cinder: Cinder
    ceph: Any  # tests.ceph.cluster.CephCluster
    cinder_key: str  # client.cinder's cephx key (what a cinder-mode node needs)
    region: str = REGION
    username: str = "csi"
    password: str = USER_PASSWORD
    project: str = "csi-test"
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def auth_url(self) -> str:
        return self.keystone.url

    def _connect(self, username: str, password: str, project: str) -> Any:
        from openstack import connection
        from openstack.config import loader

        cfg = loader.OpenStackConfig(load_yaml_config=False, load_envvars=False)
        return connection.Connection(config=cfg.get_one(
            auth_type="password", auth={
                "auth_url": self.auth_url, "username": username, "password": password,
                "project_name": project, "user_domain_name": "Default",
                "project_domain_name": "Default"},
            region_name=self.region, api_timeout=30, block_storage_api_version="3"))

    def admin(self) -> Any:
        return self._connect("admin", ADMIN_PASSWORD, "admin")

    def user(self) -> Any:
        return self._connect(self.username, self.password, self.project)

    def application_credential(self, name: str) -> tuple[str, str]:
        """(id, secret) of a new application credential of the test user."""
        conn = self.user()
        secret = f"secret-{name}"
        cred = conn.identity.create_application_credential(
            user=conn.current_user_id, name=name, secret=secret, roles=[{"name": "member"}])
        return str(cred.id), secret

    def set_quota(self, **limits: int) -> None:
        """The test project's Cinder quotas (volumes=N, gigabytes=N; -1: unlimited)."""
        admin = self.admin()
        project = admin.identity.find_project(self.project)
        admin.block_storage.update_quota_set(project.id, **limits)

    def pause_keystone(self) -> None:
        self.keystone.process.signal(signal.SIGSTOP)

    def resume_keystone(self) -> None:
        self.keystone.process.signal(signal.SIGCONT)

    def pause_cinder(self) -> None:
        self.cinder.process.signal(signal.SIGSTOP)

    def resume_cinder(self) -> None:
        self.cinder.process.signal(signal.SIGCONT)

    def stop(self) -> None:
        self.cinder.process.stop()
        self.keystone.process.stop()


def _register(admin: Any, cinder: Cinder) -> None:
    """Projects, users, roles and Cinder's endpoints; volume types for the tests."""
    idc = admin.identity
    roles = {name: idc.find_role(name) or idc.create_role(name=name)
             for name in ("admin", "member", "reader", "service")}
    service = idc.create_project(name="service", domain_id="default")
    tenant = idc.create_project(name="csi-test", domain_id="default")
    cinder_user = idc.create_user(name="cinder", password=SERVICE_PASSWORD, domain_id="default")
    for role in ("admin", "service"):  # service: the role Cinder's policies want of a service
        idc.assign_project_role_to_user(service, cinder_user, roles[role])
    csi = idc.create_user(name="csi", password=USER_PASSWORD, domain_id="default")
    for role in ("member", "reader"):
        idc.assign_project_role_to_user(tenant, csi, roles[role])
    volume = idc.create_service(name="cinderv3", type="volumev3")
    for interface in ("public", "internal", "admin"):
        idc.create_endpoint(service_id=volume.id, interface=interface, region_id=REGION,
                            url=f"http://127.0.0.1:{cinder.port}/v3/%(project_id)s")


def _types(admin: Any) -> None:
    bs = admin.block_storage
    for name, specs in (("ceph1", {"volume_backend_name": "ceph1"}),
                        ("ceph2", {"volume_backend_name": "ceph2"}),
                        ("ceph1-multi", {"volume_backend_name": "ceph1",
                                         "multiattach": "<is> True"}),
                        # no backend named: the scheduler places it in either zone
                        ("berth-any-zone", {})):
        if not any(t.name == name for t in bs.types()):
            bs.create_type(name=name, extra_specs=specs)


def _catching(fn: Any, into: list[BaseException]) -> Any:
    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            into.append(exc)
    return run


def start_cloud(base: Path, ceph: Any) -> OpenStack:
    """Keystone and Cinder on `ceph` (a started tests.ceph.cluster.CephCluster)."""
    lost = missing()
    if lost:
        raise RuntimeError(f"OpenStack packages missing: {', '.join(lost)}; run "
                           "scripts/install-openstack")
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    for pool in ("volumes", "volumes2"):
        ceph.ceph("osd", "pool", "create", pool, "8", "8", "replicated")
        ceph.ceph("osd", "pool", "set", pool, "size", "1", "--yes-i-really-mean-it")
        ceph.rbd("pool", "init", pool)
    keyring = ceph.base / "ceph.client.cinder.keyring"  # the cluster's conf finds it by name
    ceph.ceph("auth", "get-or-create", "client.cinder", "mon", "profile rbd", "osd",
              "profile rbd pool=volumes, profile rbd pool=volumes2", "-o", str(keyring))
    key = next(line.split("=", 1)[1].strip() for line in keyring.read_text().splitlines()
               if line.strip().startswith("key"))
    timings["ceph_pools_s"] = time.monotonic() - t0
    keystone = Keystone(base / "keystone")
    cinder = Cinder(base / "cinder", keystone, ceph.conf)
    cloud = OpenStack(keystone, cinder, ceph, key, timings=timings)
    try:
        t0 = time.monotonic()
        # Independent one-offs (each keystone-manage or cinder-manage run costs 1.5-2.5 s of
        # start-up): Cinder's database beside Keystone's.
        failed: list[BaseException] = []
        synced = threading.Thread(target=_catching(cinder.db_sync, failed), name="db-sync")
        synced.start()
        keystone.bootstrap()
        synced.join()
        if failed:
            raise failed[0]
        timings["one_off_setup_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        keystone.start()
        timings["keystone_ready_s"] = time.monotonic() - t0
        _register(cloud.admin(), cinder)
        admin = cloud.admin()  # a token whose catalog has Cinder's endpoints
        t0 = time.monotonic()
        cinder.start(admin)
        timings["cinder_ready_s"] = time.monotonic() - t0
        _types(admin)
        # Cinder's defaults (10 volumes) would bound the bench; tests set their own.
        cloud.set_quota(volumes=-1, gigabytes=-1, snapshots=-1)
    except BaseException:
        cloud.stop()
        raise
    return cloud


@contextlib.contextmanager
def running_cloud(base: Path) -> Iterator[OpenStack]:
    """A Ceph cluster, Keystone and Cinder in `base`, all stopped on the way out (the bench)."""
    from tests.ceph.cluster import start_cluster

    ceph = start_cluster(base / "ceph", mgr=True)
    try:
        cloud = start_cloud(base / "openstack", ceph)
        try:
            yield cloud
        finally:
            cloud.stop()
    finally:
        ceph.stop()
