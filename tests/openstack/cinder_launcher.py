#!/usr/bin/python3
"""cinder-api, cinder-scheduler and one cinder-volume per enabled backend in ONE process (green
threads under oslo.service), so oslo.messaging's in-memory `fake://` transport connects them and
the tests need no RabbitMQ. Run with Debian's /usr/bin/python3: `cinder_launcher.py --config-file
cinder.conf`. Mirrors cinder.cmd.api/scheduler/volume."""

import eventlet

eventlet.monkey_patch()

import threading  # noqa: E402

import __original_module_threading as orig_threading  # noqa: E402

orig_threading.current_thread.__globals__["_active"] = threading._active  # as cinder.cmd.api

import logging as python_logging  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402

import os_brick  # noqa: E402
from cinder import i18n  # noqa: E402
from oslo_config import cfg  # noqa: E402
from oslo_log import log as logging  # noqa: E402
from oslo_privsep import priv_context  # noqa: E402
from oslo_service import service as os_service  # noqa: E402

i18n.enable_lazy()
from cinder import coordination, objects, rpc, service, utils, version  # noqa: E402
from cinder.cmd import volume as volume_cmd  # noqa: E402
from cinder.common import config  # noqa: E402

# Service.service_id is a class attribute: with several services in one process every heartbeat
# would update the row of the service made last, and the others would turn "down".
_report_state = service.Service.report_state


def _own_report_state(self):  # type: ignore[no-untyped-def]
    service.Service.service_id = getattr(self, "origin_service_id", service.Service.service_id)
    return _report_state(self)


service.Service.report_state = _own_report_state
CONF = cfg.CONF


def main() -> None:
    objects.register_all()
    CONF(sys.argv[1:], project="cinder", version=version.version_string())
    config.set_middleware_defaults()
    logging.setup(CONF, "cinder")
    python_logging.captureWarnings(True)
    priv_context.init(root_helper=shlex.split(utils.get_root_helper()))
    utils.monkey_patch()
    os_brick.setup(CONF)
    coordination.COORDINATOR.start()
    rpc.init(CONF)
    launcher = os_service.ServiceLauncher(CONF)
    launcher.launch_service(service.WSGIService("osapi_volume"))
    launcher.launch_service(service.Service.create(binary="cinder-scheduler"))
    for backend in filter(None, CONF.enabled_backends):
        CONF.register_opt(volume_cmd.host_opt, group=backend)
        host = f"{getattr(CONF, backend).backend_host or CONF.host}@{backend}"
        launcher.launch_service(service.Service.create(
            host=host, service_name=backend, binary="cinder-volume", coordination=True))
    launcher.wait()


if __name__ == "__main__":
    main()
