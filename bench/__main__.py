"""`python -m bench`: start the driver, run the scenarios, clean up, print and save the report.

Run it through bench/run, which puts it in a private mount namespace: nothing it mounts (or that
the driver mounts for it) can outlive it or show on the host.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import asdict, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from . import leaks, serverlog
from .csi import Csi, MiB
from .driver import REPO, DriverError, DriverProcess, RssSampler, start, status_kib
from .fs import FsError, loop_filesystem
from .measure import Measurement
from .ops import Ops
from .rbd_scenarios import RBD_ALIASES, RBD_DEFAULT_PLAN, RBD_QUICK_PLAN, RBD_SCENARIOS
from .report import Report, render, write_json
from .scenarios import DEFAULT_PLAN, QUICK_PLAN, SCENARIOS

if TYPE_CHECKING:  # imported when used: it puts the repo root on sys.path for tests/ceph
    from .rbd import RbdRun

IDLE_SETTLE_S = 0.5  # let start-up allocations finish before the idle RSS reading
ALIASES = {"clone": "snapshot", "create": "create-delete", "delete": "create-delete"}
BACKENDS = ("hostpath", "rbd", "nfs")
DEFAULT_OUT = {"hostpath": "latest.json", "rbd": "rbd-latest.json", "nfs": "nfs-latest.json"}
HOSTPATH_ONLY = ("fs", "image_gib", "data_path", "fill_mib")
DEFAULT_IMAGE_GIB = 8

# A scenario with its plan bound: it takes the operations and the data every write uses.
Scenario = Callable[[Ops, bytes], list[Measurement]]
P = TypeVar("P")


def bind(scenarios: Mapping[str, Callable[[Ops, P, bytes], list[Measurement]]], plan: P
         ) -> dict[str, Scenario]:
    def bound(fn: Callable[[Ops, P, bytes], list[Measurement]]) -> Scenario:
        return lambda ops, base: fn(ops, plan, base)

    return {name: bound(fn) for name, fn in scenarios.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run", description="Benchmark the Berth CSI driver.")
    p.add_argument("--backend", choices=BACKENDS, default="hostpath",
                   help="hostpath (default); rbd: Ceph RBD on a single-node Ceph cluster, "
                        "nfs: NFS-Ganesha, each started and stopped by the run "
                        "(hostpath-only options are refused)")
    p.add_argument("--quick", action="store_true", help="small counts: a smoke run of seconds")
    p.add_argument("--only", help=f"comma-separated scenarios: {', '.join(SCENARIOS)} "
                                  "(clone is an alias of snapshot); with --backend rbd: "
                                  f"{', '.join(RBD_SCENARIOS)}")
    p.add_argument("-n", type=float, default=1.0, metavar="FACTOR",
                   help="multiply every operation count by FACTOR")
    p.add_argument("--fs", choices=["none", "xfs", "ext4"], default=None,
                   help="put the backend on a fresh loop-mounted filesystem of this type")
    p.add_argument("--image-gib", type=int, default=None,
                   help=f"size of the --fs image (sparse, default {DEFAULT_IMAGE_GIB})")
    p.add_argument("--data-path", help="put the backend in a fresh directory under this path")
    p.add_argument("--fill-mib", type=int, help="data in the snapshot/clone source volume "
                                                "(default 1024, 64 with --quick)")
    p.add_argument("--driver-src", default=REPO, metavar="DIR",
                   help="run the csi_driver package of another checkout, e.g. a baseline commit "
                        "exported with git archive (default: this repo)")
    p.add_argument("--in-guest", action="store_true",
                   help="with --backend nfs: run the controller inside a User-Mode Linux guest "
                        "(slow system calls, like a small VM) and time csi-driver-nfs's method, "
                        "tar over a kernel NFS mount, in the same guest")
    p.add_argument("--out", help="where to write the JSON report (default "
                                 "bench/results/latest.json, rbd-latest.json with --backend rbd)")
    args = p.parse_args(argv)
    if args.in_guest and args.backend != "nfs":
        p.error("--in-guest: for --backend nfs only")
    if args.backend != "hostpath":
        given = [f"--{o.replace('_', '-')}" for o in HOSTPATH_ONLY if getattr(args, o) is not None]
        if given:
            p.error(f"{', '.join(given)}: for --backend hostpath only")
    if args.fs is None:
        args.fs = "none"
    if args.image_gib is None:
        args.image_gib = DEFAULT_IMAGE_GIB
    if args.out is None:
        name = "nfs-guest-latest.json" if args.in_guest else DEFAULT_OUT[args.backend]
        args.out = os.path.join(REPO, "bench", "results", name)
    if args.fs != "none" and args.data_path:
        p.error("--fs and --data-path both choose where the data goes; give one")
    if args.data_path and not os.path.isdir(args.data_path):
        p.error(f"--data-path {args.data_path}: not a directory")
    if not os.path.isfile(os.path.join(args.driver_src, "csi_driver", "__main__.py")):
        p.error(f"--driver-src {args.driver_src}: no csi_driver package there")
    args.driver_src = os.path.abspath(args.driver_src)
    if args.n <= 0:
        p.error("-n must be positive")
    return args


def selected(only: str | None, scenarios: Mapping[str, object] = SCENARIOS,
             aliases: Mapping[str, str] = ALIASES) -> list[str]:
    if not only:
        return list(scenarios)
    wanted = {aliases.get(w.strip(), w.strip()) for w in only.split(",") if w.strip()}
    unknown = wanted - set(scenarios)
    if unknown:
        raise SystemExit(f"bench: unknown scenario(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(scenarios)}")
    return [s for s in scenarios if s in wanted]  # always in the documented order


def git_state(source: str) -> dict[str, str]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", source, *args], capture_output=True, text=True,
                              check=False, timeout=30)
        return done.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"),
            "dirty": "yes" if git("status", "--porcelain", "--", "csi_driver") else "no"}


def in_private_namespace() -> bool:
    """Whether bench/run's unshare put us in a mount namespace of our own.

    bench/run records the namespace it started in; comparing with that works wherever it was
    started from (our parent may be gone, and /proc/1 may not be readable in a container).
    """
    outer = os.environ.get("BENCH_OUTER_MNT_NS")
    return bool(outer) and os.readlink("/proc/self/ns/mnt") != outer


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def run_scenarios(report: Report, driver: DriverProcess, ops: Ops,
                  scenarios: Mapping[str, Scenario], names: list[str]) -> None:
    base = os.urandom(MiB)  # the data every write uses; see scenarios.write_file
    for name in names:
        log(f"scenario {name} ...")
        t0 = time.perf_counter()
        try:
            report.add(name, scenarios[name](ops, base))
        except Exception as exc:  # a benchmark bug: report it, still clean up and go on
            traceback.print_exc()
            report.bench_failures.append(f"{name}: {exc!r}")
        except KeyboardInterrupt:
            report.bench_failures.append(f"interrupted during {name}")
            log("interrupted; cleaning up (the report covers the scenarios before this one)")
            return
        log(f"scenario {name} took {time.perf_counter() - t0:.1f}s")
        if driver.proc.poll() is not None:  # later scenarios would only pile up UNAVAILABLE
            report.bench_failures.append(
                f"driver exited ({driver.proc.returncode}) during {name}; stopped there. "
                f"Its last log lines:\n{driver.log_tail()}")
            return


def finish(report: Report, driver: DriverProcess, csi: Csi, ops: Ops, sampler: RssSampler,
           rbd: RbdRun | None = None) -> None:
    """Undo what the scenarios left, check for leaks, read peak memory, stop the driver."""
    try:
        swept = ops.sweep()
        if swept.errors:
            report.add("final", [swept])
        report.anomalies = dict(ops.anomalies)
        report.leaks += leaks.check_driver(csi)
        if rbd is not None:  # the driver purges the trash in the background: give it time
            log("waiting for the driver to empty the RBD trash ...")
            alive = driver.proc.poll() is None
            left, took = rbd.wait_for_empty_pool() if alive else rbd.wait_for_empty_pool(0.0)
            report.leaks += left
            report.meta["rbd"]["purge_wait_s"] = None if took is None else round(took, 2)
    finally:
        sampler.stop()
        hwm = status_kib(driver.pid, "VmHWM")  # before the stop: it dies with the process
        report.rss_peak_mib = sampler.peak_kib / 1024 if sampler.samples else None
        report.rss_samples = sampler.samples
        report.rss_hwm_mib = hwm / 1024 if hwm else None
        csi.close()
        try:
            report.driver_exit_code = driver.stop()
        except DriverError as exc:
            report.bench_failures.append(str(exc))


def run_driver(report: Report, args: argparse.Namespace, workdir: str, data_path: str,
               scenarios: Mapping[str, Scenario], names: list[str], keep: tuple[str, ...],
               rbd: RbdRun | None = None) -> None:
    """Everything between spawning the driver and its exit, with cleanup on every path."""
    driver = start(workdir, data_path, args.driver_src,
                   backends=rbd.backends() if rbd is not None else None)
    report.startup_ms, report.socket_ms = driver.startup_ms, driver.socket_ms
    log(f"driver pid {driver.pid} answered after {driver.startup_ms:.0f} ms")
    try:
        time.sleep(IDLE_SETTLE_S)
    except BaseException:  # interrupted already (Ctrl-C, or SIGTERM with --backend rbd)
        report.driver_exit_code = driver.stop()
        raise
    idle = status_kib(driver.pid, "VmRSS")
    report.rss_idle_mib = idle / 1024 if idle else None
    sampler = RssSampler(driver.pid)
    sampler.start()
    csi = Csi(driver.socket_path)
    ops = Ops(csi, workdir, rbd.secrets if rbd is not None else None)
    try:
        run_scenarios(report, driver, ops, scenarios, names)
    finally:
        finish(report, driver, csi, ops, sampler, rbd)
        if rbd is None:
            report.leaks += leaks.check_disk(workdir, data_path, keep)
        else:
            report.leaks += [f"still mounted: {p}" for p in leaks.mounts_under(workdir)]
            report.leaks += rbd.node_leaks()
        # Kept beside the report: its one line per RPC has the driver's side of every error.
        out_log = os.path.splitext(report.meta["out"])[0] + ".driver.log"
        os.makedirs(os.path.dirname(out_log), exist_ok=True)
        shutil.copyfile(driver.log_path, out_log)
        report.server_rpcs = serverlog.summarize(driver.log_path)
        report.meta["driver_log"] = out_log


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0 or not in_private_namespace():
        log("needs root in a private mount namespace; run it as bench/run")
        return 2
    if args.backend == "rbd":
        return main_rbd(args)
    if args.backend == "nfs":
        from .nfs import main_nfs

        return main_nfs(args)
    plan = (QUICK_PLAN if args.quick else DEFAULT_PLAN).scaled(args.n)
    if args.fill_mib:
        plan = replace(plan, fill_mib=args.fill_mib)
    names = selected(args.only)
    report = Report(run_meta(args, asdict(plan), names))
    meta = report.meta
    workdir = tempfile.mkdtemp(prefix="berth-bench-")
    keep: tuple[str, ...] = ()
    try:
        with ExitStack() as stack:
            if args.fs != "none":
                # Room for the source and, without reflink, a snapshot, a restore and a clone.
                gib = max(args.image_gib, 5 * plan.fill_mib // 1024 + 2)
                root = stack.enter_context(loop_filesystem(args.fs, workdir, gib))
                keep = (root,)
            elif args.data_path:
                root = tempfile.mkdtemp(prefix="berth-bench-", dir=args.data_path)
                stack.callback(shutil.rmtree, root, ignore_errors=True)
            else:
                root = workdir
            data_path = os.path.join(root, "data")
            meta["data_path"], meta["fs"] = data_path, leaks.fs_type_of(root)
            log(f"backend data in {data_path} ({meta['fs']}); work dir {workdir}")
            try:
                run_driver(report, args, workdir, data_path, bind(SCENARIOS, plan), names, keep)
            finally:
                leaks.force_unmount(leaks.mounts_under(workdir, keep))
    except (DriverError, FsError) as exc:
        report.bench_failures.append(str(exc))
    finally:
        remove_workdir(report, workdir)
    return conclude(report, args.out)


def main_rbd(args: argparse.Namespace) -> int:
    """--backend rbd: the same driver run, against a single-node Ceph this run starts and stops."""
    from .rbd import (
        CephError,
        RbdRun,
        end_processes,
        processes_under,
        running_cluster,
        signals_interrupt,
    )

    plan = (RBD_QUICK_PLAN if args.quick else RBD_DEFAULT_PLAN).scaled(args.n)
    names = selected(args.only, RBD_SCENARIOS, RBD_ALIASES)
    report = Report(run_meta(args, asdict(plan), names))
    workdir = tempfile.mkdtemp(prefix="berth-bench-")
    signals_interrupt()  # SIGTERM/SIGHUP too must go through the cluster's stop
    try:
        try:
            with running_cluster(workdir) as cluster:  # stops it on every way out
                rbd = RbdRun(cluster, workdir)
                report.meta["rbd"] = rbd.meta()
                log(f"Ceph cluster up in {cluster.timings.get('total', 0):.1f}s "
                    f"(pool {cluster.pool}, mon {cluster.monitors}); work dir {workdir}")
                try:
                    run_driver(report, args, workdir, "", bind(RBD_SCENARIOS, plan), names, (),
                               rbd)
                finally:
                    report.leaks += rbd.node_leaks()  # loop devices are global: detach them
                    leaks.force_unmount(leaks.mounts_under(workdir))
                log("stopping the Ceph cluster ...")
            report.meta["rbd"]["daemon_exit_codes"] = dict(cluster.exit_codes)
        finally:
            left = processes_under(workdir)
            if left:
                report.leaks += [f"process {pid} of this run still running: {cmd}"
                                 for pid, cmd in left]
                end_processes(left)
    except (DriverError, CephError) as exc:
        report.bench_failures.append(str(exc))
    except KeyboardInterrupt as exc:  # everything above is stopped by now
        report.bench_failures.append(f"interrupted ({exc or 'SIGINT'})")
    finally:
        remove_workdir(report, workdir)
    return conclude(report, args.out)


def run_meta(args: argparse.Namespace, plan: dict[str, Any], names: list[str]) -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "argv": sys.argv[1:],
        "backend": args.backend, "out": os.path.abspath(args.out), "plan": plan,
        "scenarios": names, "cpus": os.cpu_count(), "python": platform.python_version(),
        "driver_src": args.driver_src, **git_state(args.driver_src),
    }


def remove_workdir(report: Report, workdir: str) -> None:
    if leaks.mounts_under(workdir):
        report.leaks.append(f"could not unmount everything; left {workdir} in place")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def conclude(report: Report, out: str) -> int:
    print(render(report))
    write_json(report, out)
    log(f"wrote {out}; {'OK' if report.ok else 'FINDINGS (see above)'}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
