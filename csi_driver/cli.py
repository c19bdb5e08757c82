"""Command line: flags and config file -> a running server."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from . import __version__, requestid
from .config import ConfigError, load_settings
from .driver import DEFAULT_KUBELET_DIR, Driver
from .ids import NODE_ID_RE
from .server import MODES, Endpoint, EndpointError, Server


def _default_data_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/berth"
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "berth")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="csi-driver", description="Berth CSI driver",
        epilog="csi-driver check --config FILE: check a config and every backend it names")
    p.add_argument("--version", action="version", version=f"csi-driver {__version__}")
    p.add_argument("--endpoint", default=os.environ.get("CSI_ENDPOINT", "unix:///tmp/csi.sock"),
                   help="unix:///path/to/csi.sock or tcp://host:port (env CSI_ENDPOINT)")
    p.add_argument("--node-id", default=os.environ.get("NODE_ID") or socket.gethostname(),
                   help="this node's name (env NODE_ID; default: the hostname)")
    p.add_argument("--config", help="YAML config file; default: one hostPath backend in --data-dir")
    p.add_argument("--data-dir", default=_default_data_dir(),
                   help="where the built-in hostPath backend keeps volumes when --config is absent")
    p.add_argument("--kubelet-dir",
                   default=os.environ.get("BERTH_KUBELET_DIR", DEFAULT_KUBELET_DIR),
                   help="staging and target paths must lie beneath it (env BERTH_KUBELET_DIR; "
                   f"default {DEFAULT_KUBELET_DIR})")
    p.add_argument("--topology", action="append", default=[], metavar="KEY=VALUE",
                   help="a topology segment of this node, e.g. topology.kubernetes.io/zone=a "
                   "(repeatable; env BERTH_TOPOLOGY, comma-separated): reported for the keys "
                   "that configured backends place volumes by")
    p.add_argument("--mode", choices=MODES, default="all", help="which CSI services to serve")
    p.add_argument("--workers", type=int, default=16, help="concurrent RPCs")
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--metrics-address", default=os.environ.get("BERTH_METRICS_ADDRESS", ""),
                   metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (env "
                   "BERTH_METRICS_ADDRESS; ':9808' for every interface; default: off)")
    p.add_argument("--slow-rpc-seconds", type=float, default=10.0,
                   help="an RPC that takes longer also gets a WARNING line (default 10)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        from .check import main as check

        return check(argv[1:])
    args = build_parser().parse_args(argv)
    # [rid]: the request id of the RPC a line comes from, wherever in the driver it is logged.
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s [%(rid)s]: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(requestid.Stamp())
    if not NODE_ID_RE.fullmatch(args.node_id or ""):
        print(f"csi-driver: --node-id {args.node_id!r} must be 1-63 letters, digits, '.', '-' "
              "or '_', starting and ending with a letter or digit (it is a topology value)",
              file=sys.stderr)
        return 2
    given = [*(os.environ.get("BERTH_TOPOLOGY", "").split(",")), *args.topology]
    segments = {}
    for item in (g.strip() for g in given if g.strip()):
        key, eq, value = item.partition("=")
        if not eq or not key or not NODE_ID_RE.fullmatch(value):
            print(f"csi-driver: --topology {item!r}: expected KEY=VALUE, the value 1-63 "
                  "letters, digits, '.', '-' or '_'", file=sys.stderr)
            return 2
        segments[key] = value
    try:
        settings = load_settings(args.config, args.data_dir)
        endpoint = Endpoint.parse(args.endpoint)
        driver = Driver.from_settings(settings, args.node_id, args.kubelet_dir,
                                      controller=args.mode != "node",
                                      serves_node=args.mode != "controller", segments=segments)
    except (ConfigError, EndpointError) as exc:
        print(f"csi-driver: {exc}", file=sys.stderr)
        return 2
    metrics = None
    if args.metrics_address:
        from .metrics import Metrics

        metrics = Metrics(settings.driver_name)
        try:
            metrics.serve(args.metrics_address)
        except (ValueError, OSError) as exc:  # not host:port, or the port is taken
            print(f"csi-driver: --metrics-address {args.metrics_address}: "
                  f"{getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
            return 2
        for backend in driver.backends.values():
            metrics.instrument(backend)
    try:
        server = Server(driver, endpoint, args.mode, args.workers,
                        slow_ms=args.slow_rpc_seconds * 1000, observer=metrics)
        server.run_until_signalled()
    except EndpointError as exc:
        print(f"csi-driver: {exc}", file=sys.stderr)
        return 2
    return 0
