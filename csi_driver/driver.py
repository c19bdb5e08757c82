"""The running driver's shared state: settings, backend instances, node identity and locks.

The services see it through the narrow `services.plugin.Plugin` protocol, not this class."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import errors, ids
from .backends import backend_type
from .backends.base import Backend, NodeInfo
from .config import Settings
from .locks import KeyedLocks

DEFAULT_KUBELET_DIR = "/var/lib/kubelet"

BACKEND_PARAMETER = "backend"


@dataclass
class Driver:
    settings: Settings
    node: NodeInfo
    backends: dict[str, Backend[Any]]
    locks: KeyedLocks = field(default_factory=KeyedLocks)
    # The only tree the node service mounts in or removes from (--kubelet-dir).
    kubelet_dir: str = DEFAULT_KUBELET_DIR
    _started: set[str] = field(default_factory=set)
    _start_locks: dict[str, threading.Lock] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_settings(cls, settings: Settings, node_id: str,
                      kubelet_dir: str = DEFAULT_KUBELET_DIR, controller: bool = True,
                      serves_node: bool = True, segments: Mapping[str, str] | None = None
                      ) -> Driver:
        node = NodeInfo(node_id=node_id, driver_name=settings.driver_name,
                        controller=controller, serves_node=serves_node,
                        segments=dict(segments or {}))
        backends: dict[str, Backend[Any]] = {}
        for name, cfg in settings.backends.items():
            kind = backend_type(cfg.type)
            assert kind is not None  # parse_settings checked it
            backends[name] = kind(name, cfg, node)
        return cls(settings=settings, node=node, backends=backends, kubelet_dir=kubelet_dir)

    @property
    def max_volumes_per_node(self) -> int:
        return self.settings.max_volumes_per_node

    def ready(self, backend: Backend[Any]) -> Backend[Any]:
        """`backend`, started: its start() has succeeded once (a failure is raised, and the
        next call tries again). Two first callers never start it twice at once."""
        if backend.name not in self._started:
            with self._guard:
                lock = self._start_locks.setdefault(backend.name, threading.Lock())
            with lock:
                if backend.name not in self._started:
                    backend.start()
                    self._started.add(backend.name)
        return backend

    def backend_for_parameters(self, parameters: Mapping[str, str]
                               ) -> tuple[str, Backend[Any]]:
        """The backend a StorageClass picks: its `backend` parameter, or the only one configured."""
        name = parameters.get(BACKEND_PARAMETER)
        if name is None:
            if len(self.backends) == 1:
                only, backend = next(iter(self.backends.items()))
                return only, self.ready(backend)
            raise errors.InvalidArgument(
                f"parameter {BACKEND_PARAMETER!r} is required when several backends are "
                "configured; "
                f"one of: {', '.join(sorted(self.backends))}"
            )
        chosen = self.backends.get(name)
        if chosen is None:
            raise errors.InvalidArgument(
                f"parameter {BACKEND_PARAMETER}={name!r} names no configured backend; "
                f"configured: {', '.join(sorted(self.backends))}"
            )
        return name, self.ready(chosen)

    def backend_for_id(self, raw_id: str, start: bool = True
                       ) -> tuple[ids.ObjectId, Backend[Any]] | None:
        """The parsed ID and its backend (started, unless `start` is False: the node's unstage
        and unpublish must work while the storage is away), or None when the ID cannot be one
        of ours."""
        parsed = ids.parse(raw_id)
        if parsed is None:
            return None
        backend = self.backends.get(parsed.backend)
        if backend is None:
            return None
        return parsed, self.ready(backend) if start else backend
