"""`csi-driver check --config FILE`: can this config serve volumes?

Loads the config as the driver would, then for every backend runs its start-up hook and its
health probe and reads its capacity (the pool, share or directory must be there and the
credentials accepted), each bounded in time. One line per backend; exit 0 when every backend
answered, 1 when one did not, 2 for a config that does not load. The Helm chart runs it as its
`helm test` hook.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .backends.base import Backend
from .config import ConfigError, load_settings
from .driver import Driver
from .errors import CsiError, FailedPrecondition
from .node import bounded


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.1f} GiB"


def check_backend(backend: Backend[Any], timeout: float) -> str:
    """What the backend can offer, as a phrase; raises CsiError when it cannot serve."""
    def run() -> str:
        backend.start()
        backend.probe()
        try:
            return f"{_gib(backend.capacity({}).available)} available"
        except FailedPrecondition as exc:  # reachable, but it tells no capacity
            return f"reachable; no capacity figure: {exc.message}"

    return str(bounded.call(f"check:{backend.name}", run, timeout=timeout))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="csi-driver check",
                                description="check a config and every backend it names")
    p.add_argument("--config", required=True, help="the YAML config file the driver would use")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds each backend may take to answer (default 30)")
    args = p.parse_args(argv)
    try:
        settings = load_settings(args.config, "")
    except ConfigError as exc:
        print(f"config: {exc}")
        return 2
    print(f"config {args.config}: {len(settings.backends)} backend(s), driver "
          f"{settings.driver_name}")
    # Neither controller nor node: no purger, no sweep of copies, no node registration.
    driver = Driver.from_settings(settings, "check", controller=False, serves_node=False)
    failed = 0
    for name, backend in driver.backends.items():
        try:
            print(f"ok    {name} ({backend.type_name}): {check_backend(backend, args.timeout)}")
        except CsiError as exc:
            failed += 1
            print(f"FAIL  {name} ({backend.type_name}): {exc.code.name}: {exc.message}")
        except Exception as exc:  # a check reports, it does not crash
            failed += 1
            print(f"FAIL  {name} ({backend.type_name}): unexpected {type(exc).__name__}: {exc}")
    sys.stdout.flush()
    return 1 if failed else 0
