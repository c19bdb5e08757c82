"""Prometheus metrics (--metrics-address; off by default).

  csi_plugin_operations_seconds{driver_name, method_name, grpc_status_code}
      every RPC, named as the kubernetes-csi sidecars name theirs (csi_sidecar_operations_seconds),
      so one dashboard reads both; its _count is the calls by code
  berth_operations_in_flight{method_name}
  berth_backend_operation_seconds{backend, backend_type, operation}
  berth_backend_operation_errors_total{backend, operation, grpc_status_code}
  berth_background_queue{backend, queue}
      work a backend does beside the RPCs: copies running, trash waiting, images to purge
  berth_backend_requests_total{backend, service}
      requests a backend sent to a remote API (Cinder's, Nova's), which may bill or throttle them

No label carries a volume name, an ID or anything from a request's secrets: the label values are
method, backend and status names only, so the series stay few and say nothing private.

prometheus-client is imported only when metrics are switched on: a driver without them does not
pay its memory. Backends report their queues through `report_queue`, which needs nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .errors import CsiError

# The sidecars' buckets (csi-lib-utils), so the histograms line up.
BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 25.0, 50.0, 120.0, 300.0, 600.0)
# The backend methods timed per backend (the interface's public ones).
OPERATIONS = ("start", "probe", "create_volume", "delete_volume", "list_volumes", "capacity",
              "update_volume", "create_snapshot", "delete_snapshot", "list_snapshots",
              "create_group_snapshot", "delete_group_snapshot", "get_group_snapshot", "attach",
              "detach", "node_known", "stage", "unstage", "node_expand", "node_condition")

_queues: dict[tuple[str, str], Callable[[], int]] = {}
_queues_lock = threading.Lock()


_requests: dict[tuple[str, str], int] = {}


def count_request(backend: str, service: str) -> None:
    """One more request from `backend` to the remote `service` (no I/O, no prometheus)."""
    with _queues_lock:
        _requests[(backend, service)] = _requests.get((backend, service), 0) + 1


def report_queue(backend: str, queue: str, size: Callable[[], int]) -> None:
    """Have `size()` (cheap, no I/O: it runs at every scrape) reported as the backend's queue."""
    with _queues_lock:
        _queues[(backend, queue)] = size


def code_name(code: Any) -> str:
    """A grpc.StatusCode as Go spells it (InvalidArgument), which is what the sidecars report."""
    name = str(code.name)
    return "OK" if name == "OK" else "".join(p.capitalize() for p in name.split("_"))


class Metrics:
    def __init__(self, driver_name: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.driver_name = driver_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.rpc = Histogram("csi_plugin_operations_seconds",
                             "CSI RPCs served, by method and gRPC status",
                             ("driver_name", "method_name", "grpc_status_code"),
                             buckets=BUCKETS, registry=self.registry)
        self.in_flight = Gauge("berth_operations_in_flight", "RPCs being served",
                               ("method_name",), registry=self.registry)
        self.backend = Histogram("berth_backend_operation_seconds",
                                 "Calls into a backend, by operation",
                                 ("backend", "backend_type", "operation"),
                                 buckets=BUCKETS, registry=self.registry)
        self.backend_errors = Counter("berth_backend_operation_errors",
                                      "Backend calls that raised, by gRPC status",
                                      ("backend", "operation", "grpc_status_code"),
                                      registry=self.registry)

        class Queues:
            def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
                family = GaugeMetricFamily("berth_background_queue",
                                           "Work a backend does beside the RPCs",
                                           labels=("backend", "queue"))
                with _queues_lock:
                    queues = list(_queues.items())
                for (backend, queue), size in queues:
                    try:
                        family.add_metric((backend, queue), size())
                    except Exception:  # a broken callback must not break the scrape
                        continue
                yield family
                sent = CounterMetricFamily("berth_backend_requests",
                                           "Requests a backend sent to a remote API",
                                           labels=("backend", "service"))
                with _queues_lock:
                    counts = list(_requests.items())
                for (backend, service), count in counts:
                    sent.add_metric((backend, service), count)
                yield sent

        self.registry.register(Queues())

    # -- RPCs (interceptors.RpcInterceptor calls these) ----------------------------------------
    def rpc_started(self, method: str) -> None:
        self.in_flight.labels(method).inc()

    def rpc_finished(self, method: str, code: Any, seconds: float) -> None:
        self.in_flight.labels(method).dec()
        self.rpc.labels(self.driver_name, method, code_name(code)).observe(seconds)

    # -- backends --------------------------------------------------------------------------------
    def instrument(self, backend: Any) -> None:
        """Time every interface call of `backend` (instance attributes shadow its methods, so
        every caller is counted, and the backend knows nothing of it)."""
        for op in OPERATIONS:
            method = getattr(backend, op, None)
            if method is not None:
                setattr(backend, op, self._timed(backend.name, backend.type_name, op, method))

    def _timed(self, name: str, kind: str, op: str, method: Callable[..., Any]
               ) -> Callable[..., Any]:
        histogram = self.backend.labels(name, kind, op)

        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                result = method(*args, **kwargs)
                if op.startswith("list_"):  # lazy results: the work is in the reading
                    result = list(result)
                return result
            except CsiError as exc:
                self.backend_errors.labels(name, op, code_name(exc.code)).inc()
                raise
            except Exception:
                self.backend_errors.labels(name, op, "Internal").inc()
                raise
            finally:
                histogram.observe(time.perf_counter() - start)

        return call

    def serve(self, address: str) -> None:
        """Serve /metrics on `address` (host:port; ":port" for every interface) in a thread."""
        from prometheus_client import start_http_server

        host, port = split_address(address)
        start_http_server(port, addr=host, registry=self.registry)


def split_address(address: str) -> tuple[str, int]:
    """("host", port) from "host:port", "[v6]:port" or ":port"; ValueError otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)
