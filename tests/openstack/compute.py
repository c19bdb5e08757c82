"""Nova and Placement from Debian's packages, on loopback, next to the Keystone and Cinder of
services.py, for the tests of `attach: nova`.

Real: nova-api (Keystone auth, microversions, policies), conductor, scheduler (Placement
allocation candidates, filters) and nova-compute's volume attach/detach code, which calls Cinder
for real (attachments with the compute host's connector, Cinder's service-token check on
detach), and Placement (under uwsgi, like Keystone). Stand-ins: the virt driver is
`fake.FakeDriver` (a server is a database row: no machine, no disk appears anywhere), and Neutron
is neutron_stub.py (empty lists): servers are booted with `"networks": "none"`. Servers boot from
a bootable Cinder volume (there is no Glance). All four Nova services run in one process
(nova_launcher.py, `fake://` messaging) with /usr/bin/python3; every process dies with the one
that started it.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .services import FILES, REGION, OpenStack, Process, free_port, uwsgi

HERE = Path(__file__).parent
NOVA_PASSWORD = "berth-nova-pw"
PLACEMENT_PASSWORD = "berth-placement-pw"
#: The one nova-compute's host name (what Nova puts in the connector it gives Cinder).
COMPUTE_HOST = "nova-ci"
FLAVOR = "berth.tiny"
#: Microversion of the requests made here: 2.37 allows `"networks": "none"`.
MICROVERSION = "2.37"
_PACKAGES = {"/usr/lib/python3/dist-packages/nova": "python3-nova",
             "/usr/lib/python3/dist-packages/placement": "python3-placement",
             "/usr/bin/placement-api": "python3-placement"}


class NovaError(RuntimeError):
    """Nova or Placement did not start, or a server did not become ACTIVE."""


def missing() -> list[str]:
    """Debian packages (or files unpacked by scripts/install-openstack) Nova needs and lacks."""
    lost = sorted({pkg for path, pkg in _PACKAGES.items() if not os.path.exists(path)})
    if not all((FILES / "nova" / f).exists() for f in ("api-paste.ini", "nova-manage")):
        lost.append(f"the files scripts/install-openstack unpacks into {FILES}/nova")
    return lost


_DB_SETUP = """
import sys
from nova.cmd import manage
from nova import config, objects
conf, cell0, cell1 = sys.argv[1:]
config.parse_args(["nova-manage", "--config-file", conf])
objects.register_all()
cells = manage.CellV2Commands()
for step in (lambda: manage.ApiDbCommands().sync(), lambda: cells.map_cell0(cell0),
             lambda: cells.create_cell(name="cell1", database_connection=cell1,
                                       transport_url="fake://"),
             lambda: manage.DbCommands().sync()):
    if step() not in (None, 0):
        sys.exit(f"nova db set-up failed at step {step}")
"""


def _finish(what: str, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    """Wait for a one-off command started by Popen (stdout piped, stderr merged)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.communicate()
        raise NovaError(f"{what}: no end in {timeout:.0f} s") from exc
    if proc.returncode != 0:
        raise NovaError(f"{what} exited {proc.returncode}: {out[-3000:]}")


def _start(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait(what: str, probe: Any, proc: Process, log: Path, timeout: float = 60) -> None:
    """Call probe() until it returns true, while `proc` lives, for at most `timeout` s."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not proc.alive():
            raise NovaError(f"{what}: the process exited:\n{_tail(log)}")
        try:
            if probe():
                return
        except Exception as exc:  # not up yet: connection refused, 503, ...
            last = exc
        time.sleep(0.1)
    raise NovaError(f"{what}: not within {timeout:.0f} s (last error: {last!r}):\n{_tail(log)}")


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _auth(section: str, keystone_url: str, user: str, password: str) -> str:
    """A keystoneauth password section for a service user in project `service`."""
    return f"""[{section}]
auth_type = password
auth_url = {keystone_url}
username = {user}
password = {password}
project_name = service
user_domain_name = Default
project_domain_name = Default
region_name = {REGION}
"""


class Placement:
    """Placement under uwsgi (one process, one thread: sqlite), Keystone auth."""

    def __init__(self, base: Path, keystone_url: str) -> None:
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        etc = base / "etc"
        for d in ("etc", "log"):
            (base / d).mkdir(parents=True, exist_ok=True)
        self.conf = etc / "placement.conf"
        self.conf.write_text(f"""[DEFAULT]
log_file = {base}/log/placement.log
use_stderr = false
[api]
auth_strategy = keystone
[placement_database]
connection = sqlite:///{base}/placement.sqlite
{_auth("keystone_authtoken", keystone_url, "placement", PLACEMENT_PASSWORD)}
www_authenticate_uri = {keystone_url}
http_connect_timeout = 5
http_request_max_retries = 1
""")
        self.log = base / "log" / "placement.log"
        self.process = Process("placement", uwsgi(self.port, "/usr/bin/placement-api"),
                               base / "log" / "uwsgi.log",
                               env={"OS_PLACEMENT_CONFIG_DIR": str(etc)})

    def db_sync(self) -> subprocess.Popen[str]:
        """Start `placement-manage db sync`; wait with _finish()."""
        return _start(["/usr/bin/placement-manage", "--config-file", str(self.conf), "db", "sync"])

    def start(self) -> None:
        import urllib.request

        def root_ok() -> bool:  # GET / (the version document) needs no token
            with urllib.request.urlopen(self.url, timeout=2) as resp:
                return bool(resp.status == 200)

        self.process.start()
        _wait("placement", root_ok, self.process, self.process.log)


class NeutronStub:
    """neutron_stub.py: empty lists for every GET (Nova asks even with no networks)."""

    def __init__(self, base: Path) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = Process("neutron-stub", ["/usr/bin/python3", str(HERE / "neutron_stub.py"),
                                                str(self.port)], base / "neutron-stub.log")

    def start(self) -> None:
        import urllib.request

        def up() -> bool:
            with urllib.request.urlopen(self.url, timeout=2) as resp:
                return bool(resp.status == 200)

        self.process.start()
        _wait("neutron stub", up, self.process, self.process.log)


class Nova:
    """nova-api + conductor + scheduler + compute (fake virt driver) in one process."""

    def __init__(self, base: Path, keystone_url: str, image_url: str) -> None:
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v2.1"
        etc, state = base / "etc", base / "state"
        for d in ("etc", "log", "state/lock", "state/instances"):
            (base / d).mkdir(parents=True, exist_ok=True)
        (etc / "api-paste.ini").write_bytes((FILES / "nova" / "api-paste.ini").read_bytes())
        self.api_db = state / "nova_api.sqlite"
        self.cell0_db = state / "nova_cell0.sqlite"
        self.cell1_db = state / "nova.sqlite"
        extra = {
            "keystone_authtoken": f"www_authenticate_uri = {keystone_url}\n"
                                  "http_connect_timeout = 5\nhttp_request_max_retries = 1\n",
            "placement": "", "neutron": "",
            "cinder": "catalog_info = volumev3::publicURL\ncross_az_attach = true\n"
                      f"os_region_name = {REGION}\n",
            # Cinder refuses to delete an attachment of a server without a service token
            # (OSSA-2023-003): Nova sends one with every call it makes for a user.
            "service_user": "send_service_user_token = true\n",
        }
        sections = "".join(_auth(name, keystone_url, "nova", NOVA_PASSWORD) + more
                           for name, more in extra.items())
        self.conf = etc / "nova.conf"
        self.conf.write_text(f"""[DEFAULT]
transport_url = fake://
compute_driver = fake.FakeDriver
host = {COMPUTE_HOST}
my_ip = 127.0.0.1
my_block_storage_ip = 127.0.0.1
state_path = {state}
instances_path = {state}/instances
log_dir = {base}/log
use_stderr = false
enabled_apis = osapi_compute
osapi_compute_listen = 127.0.0.1
osapi_compute_listen_port = {self.port}
osapi_compute_workers = 1
report_interval = 5
service_down_time = 30
rpc_response_timeout = 30
[wsgi]
api_paste_config = {etc}/api-paste.ini
[api]
auth_strategy = keystone
[api_database]
connection = sqlite:///{self.api_db}
[database]
connection = sqlite:///{self.cell1_db}
[oslo_concurrency]
lock_path = {state}/lock
[oslo_messaging_notifications]
driver = noop
[scheduler]
# The scheduler maps new compute hosts to the cell every 2 s (no nova-manage discover_hosts).
discover_hosts_in_cells_interval = 2
workers = 1
[conductor]
workers = 1
[vnc]
enabled = false
[glance]
# There is no Glance; Nova only formats image URLs for its notifications with it.
api_servers = {image_url}
{sections}""")
        self.log = base / "log" / "nova_launcher.log"
        self.process = Process("nova", ["/usr/bin/python3", str(HERE / "nova_launcher.py"),
                                        "--config-file", str(self.conf)],
                               base / "log" / "launcher.out")

    def db_setup(self) -> subprocess.Popen[str]:
        """Start making the API database, cell0 and cell1 (on `fake://`), migrated: what
        `nova-manage api_db sync`, `cell_v2 map_cell0`, `cell_v2 create_cell` and `db sync` do,
        in one process (each nova-manage costs ~3 s of imports). Wait with _finish()."""
        return _start(["/usr/bin/python3", "-c", _DB_SETUP, str(self.conf),
                       f"sqlite:///{self.cell0_db}", f"sqlite:///{self.cell1_db}"])

    def host_mapped(self) -> bool:
        with sqlite3.connect(self.api_db, timeout=1) as db:
            rows = db.execute("SELECT host FROM host_mappings").fetchall()
        return (COMPUTE_HOST,) in rows

    def start(self, admin: Any) -> None:
        """Start; ready when nova-compute is up, has a resource provider in Placement and is
        mapped to cell1 (else the scheduler finds no host)."""
        self.process.start()

        def compute_ready() -> bool:
            up = {(s.binary, s.host) for s in admin.compute.services() if s.state == "up"}
            wanted = {("nova-conductor", COMPUTE_HOST), ("nova-scheduler", COMPUTE_HOST),
                      ("nova-compute", COMPUTE_HOST)}
            return wanted <= up and any(
                rp.name == COMPUTE_HOST for rp in admin.placement.resource_providers())

        _wait("nova", compute_ready, self.process, self.log, timeout=90)
        # The scheduler's periodic discovery first runs ~50 s after start: map the host now.
        if not self.host_mapped():
            _finish("nova-manage cell_v2 discover_hosts", _start([
                "/usr/bin/python3", str(FILES / "nova" / "nova-manage"), "--config-file",
                str(self.conf), "cell_v2", "discover_hosts"]))
        _wait("nova host mapping", self.host_mapped, self.process, self.log, timeout=30)


def _register(admin: Any, placement: Placement, nova: Nova, neutron: NeutronStub) -> None:
    """Users nova and placement (admin + service in project service) and the endpoints of
    compute, placement and the network stub."""
    idc = admin.identity
    service_project = idc.find_project("service", domain_id="default")
    roles = {name: idc.find_role(name) for name in ("admin", "service")}
    for name, password in (("nova", NOVA_PASSWORD), ("placement", PLACEMENT_PASSWORD)):
        user = idc.find_user(name, domain_id="default") or idc.create_user(
            name=name, password=password, domain_id="default")
        for role in roles.values():  # service: Cinder's check for service tokens wants it
            idc.assign_project_role_to_user(service_project, user, role)
    for name, kind, url in (("nova", "compute", nova.url),
                            ("placement", "placement", placement.url),
                            ("neutron", "network", neutron.url)):
        svc = idc.create_service(name=name, type=kind)
        for interface in ("public", "internal", "admin"):
            idc.create_endpoint(service_id=svc.id, interface=interface, region_id=REGION,
                                url=url)


@dataclass
class NovaCloud:
    """A running Nova next to `cloud`: boot servers (the test user's) and attach volumes to
    them through Nova (`POST /servers/{id}/os-volume_attachments`)."""

    cloud: OpenStack
    placement: Placement
    nova: Nova
    neutron: NeutronStub
    flavor_id: str
    #: The compute host's name: every server runs there (Nova's connector names it).
    host: str = COMPUTE_HOST
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def compute_url(self) -> str:
        return self.nova.url

    @property
    def log(self) -> Path:
        """nova's log (api, conductor, scheduler and compute: one process)."""
        return self.nova.log

    def boot_server(self, name: str, wait: float = 60) -> str:
        """A new server of the test user, ACTIVE, booted from a new 1 GiB bootable Cinder
        volume (az1, deleted with the server); its id. Each server can stand for a node."""
        conn = self.cloud.user()
        bs = conn.block_storage
        root = bs.create_volume(size=1, name=f"{name}-root", availability_zone="az1",
                                volume_type="ceph1")
        root = bs.wait_for_status(root, "available", failures=["error"], interval=0.1,
                                  wait=wait)
        bs.post(f"/volumes/{root.id}/action", json={"os-set_bootable": {"bootable": True}})
        resp = conn.compute.post("/servers", microversion=MICROVERSION, json={"server": {
            "name": name, "flavorRef": self.flavor_id, "networks": "none",
            "block_device_mapping_v2": [{
                "boot_index": 0, "uuid": root.id, "source_type": "volume",
                "destination_type": "volume", "delete_on_termination": True}]}})
        if resp.status_code != 202:
            raise NovaError(f"boot {name}: HTTP {resp.status_code}: {resp.text}")
        server_id = str(resp.json()["server"]["id"])
        deadline = time.monotonic() + wait
        while True:
            server = conn.compute.get(f"/servers/{server_id}",
                                      microversion=MICROVERSION).json()["server"]
            if server["status"] == "ACTIVE":
                return server_id
            if server["status"] == "ERROR" or time.monotonic() > deadline:
                raise NovaError(f"server {name} is {server['status']}: "
                                f"{server.get('fault')}\n{_tail(self.log)}")
            time.sleep(0.1)

    def delete_server(self, server_id: str, wait: float = 60) -> None:
        """Delete a server (and its root volume) and wait until it is gone."""
        conn = self.cloud.user()
        conn.compute.delete(f"/servers/{server_id}", microversion=MICROVERSION)
        deadline = time.monotonic() + wait
        while conn.compute.get(f"/servers/{server_id}",
                               microversion=MICROVERSION).status_code != 404:
            if time.monotonic() > deadline:
                raise NovaError(f"server {server_id} not deleted within {wait:.0f} s")
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in (self.nova.process, self.placement.process, self.neutron.process):
            proc.stop()


def start_nova(base: Path, cloud: OpenStack) -> NovaCloud:
    """Placement, the Neutron stub and Nova in `base`, registered in `cloud`'s Keystone."""
    lost = missing()
    if lost:
        raise NovaError(f"Nova packages missing: {', '.join(lost)}; run scripts/install-openstack")
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    keystone_url = cloud.auth_url
    placement = Placement(base / "placement", keystone_url)
    neutron = NeutronStub(base / "neutron-stub")
    nova = Nova(base / "nova", keystone_url, f"{neutron.url}/image")
    started: list[Process] = []
    setups: list[subprocess.Popen[str]] = []
    try:
        setups = [placement.db_sync(), nova.db_setup()]
        _register(cloud.admin(), placement, nova, neutron)
        started.append(neutron.process)
        neutron.start()
        _finish("placement-manage db sync", setups[0])
        started.append(placement.process)
        placement.start()  # while Nova's databases are made
        timings["placement_ready_s"] = round(time.monotonic() - t0, 2)
        _finish("nova's database set-up", setups[1])
        timings["one_off_setup_s"] = round(time.monotonic() - t0, 2)
        t0 = time.monotonic()
        admin = cloud.admin()  # a token whose catalog has the new endpoints
        started.append(nova.process)
        nova.start(admin)
        flavor = admin.compute.create_flavor(name=FLAVOR, ram=64, vcpus=1, disk=0)
        timings["nova_ready_s"] = round(time.monotonic() - t0, 2)
    except BaseException:
        for setup in setups:
            if setup.poll() is None:
                setup.kill()
                setup.wait()
        for proc in reversed(started):
            proc.stop()
        raise
    return NovaCloud(cloud, placement, nova, neutron, str(flavor.id), timings=timings)


@pytest.fixture(scope="session")
def nova_cloud(openstack_cloud: OpenStack, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[NovaCloud]:
    """Nova (fake virt driver) + Placement + a Neutron stub next to `openstack_cloud`, started
    on first use. Fails (never skips) when the packages are missing."""
    lost = missing()
    if lost:
        pytest.fail(f"Nova packages missing: {', '.join(lost)}. Install them with "
                    "scripts/install-openstack.", pytrace=False)
    running = start_nova(tmp_path_factory.mktemp("nova"), openstack_cloud)
    try:
        yield running
    finally:
        running.stop()
