#!/usr/bin/python3
"""nova-api (osapi_compute), nova-conductor, nova-scheduler and nova-compute in ONE process (green
threads under oslo.service), so oslo.messaging's in-memory `fake://` transport connects them and
the tests need no RabbitMQ. Run with Debian's /usr/bin/python3: `nova_launcher.py --config-file
nova.conf`. Mirrors nova.cmd.api/conductor/scheduler/compute, except that nova-compute keeps
direct database access (it shares the process with the conductor)."""

import nova.monkey_patch  # eventlet, before anything else: as nova.cmd does

# isort: split
import sys

import nova.conf
from nova import config, objects, service
from oslo_log import log as logging
from oslo_service import service as os_service

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
