#!/usr/bin/python3
"""nova-api (osapi_compute), nova-conductor, nova-scheduler and nova-compute in ONE process (green
threads under oslo.service), so oslo.messaging's in-memory `fake://` transport connects them and
the tests need no RabbitMQ. Run with Debian's /usr/bin/python3: `nova_launcher.py --config-file
nova.conf`. Mirrors nova.cmd.api/conductor/scheduler/compute, except that nova-compute keeps
direct database access (it shares the process with the conductor)."""

import sys

# This directory is sys.path[0]: keep its modules (compute.py, ...) from shadowing nova's.
sys.path = [p for p in sys.path if p != __file__.rpartition("/")[0]]

import nova.monkey_patch  # type: ignore[import-untyped]  # noqa: E402 - eventlet, before the rest: as nova.cmd does

# isort: split

import nova.conf  # type: ignore[import-untyped]  # noqa: E402
from nova import config, objects, service  # noqa: E402
from oslo_log import log as logging  # type: ignore[import-untyped]  # noqa: E402
from oslo_service import service as os_service  # type: ignore[import-untyped]  # noqa: E402

CONF = nova.conf.CONF


def main() -> None:
    config.parse_args(sys.argv)
    logging.setup(CONF, "nova")
    objects.register_all()
    objects.Service.enable_min_version_cache()
    launcher = os_service.ServiceLauncher(CONF)
    launcher.launch_service(service.WSGIService("osapi_compute"))
    for binary in ("nova-conductor", "nova-scheduler", "nova-compute"):
        launcher.launch_service(service.Service.create(binary=binary))
    launcher.wait()


if __name__ == "__main__":
    main()
