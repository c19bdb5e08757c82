"""The running driver's shared state: settings, backend instances, node identity and locks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from . import errors, ids
from .backends import backend_type
from .backends.base import Backend, NodeInfo
from .config import Settings
from .locks import KeyedLocks

DEFAULT_KUBELET_DIR = "/var/lib/kubelet"

BACKEND_PARAMETER = "backend"
# Added by Kubernetes sidecars (pvc/pv names, fstype, secret references); never backend options.
K8S_PARAMETER_PREFIX = "csi.storage.k8s.io/"


@dataclass
class Driver:
    settings: Settings
    node: NodeInfo
    backends: dict[str, Backend]
    locks: KeyedLocks = field(default_factory=KeyedLocks)
    # The only tree the node service mounts in or removes from (--kubelet-dir).
    kubelet_dir: str = DEFAULT_KUBELET_DIR

    @classmethod
    def from_settings(cls, settings: Settings, node_id: str,
                      kubelet_dir: str = DEFAULT_KUBELET_DIR, controller: bool = True) -> Driver:
        node = NodeInfo(node_id=node_id, driver_name=settings.driver_name,
                        controller=controller)
        backends = {}
        for name, cfg in settings.backends.items():
            kind = backend_type(cfg.type)
            assert kind is not None  # parse_settings checked it
            backends[name] = kind(name, cfg, node)
        return cls(settings=settings, node=node, backends=backends, kubelet_dir=kubelet_dir)

    def backend_for_parameters(self, parameters: Mapping[str, str]) -> tuple[str, Backend]:
        """The backend a StorageClass picks: its `backend` parameter, or the only one configured."""
        name = parameters.get(BACKEND_PARAMETER)
        if name is None:
            if len(self.backends) == 1:
                return next(iter(self.backends.items()))
            raise errors.InvalidArgument(
                f"parameter {BACKEND_PARAMETER!r} is required when several backends are "
                "configured; "
                f"one of: {', '.join(sorted(self.backends))}"
            )
        backend = self.backends.get(name)
        if backend is None:
            raise errors.InvalidArgument(
                f"parameter {BACKEND_PARAMETER}={name!r} names no configured backend; "
                f"configured: {', '.join(sorted(self.backends))}"
            )
        return name, backend

    def backend_for_id(self, raw_id: str) -> tuple[ids.ObjectId, Backend] | None:
        """The parsed ID and its backend, or None when the ID cannot be one of ours."""
        parsed = ids.parse(raw_id)
        if parsed is None:
            return None
        backend = self.backends.get(parsed.backend)
        return None if backend is None else (parsed, backend)

    @staticmethod
    def backend_parameters(parameters: Mapping[str, str]) -> dict[str, str]:
        """Parameters minus the ones the driver itself consumes."""
        return {
            k: v
            for k, v in parameters.items()
            if k != BACKEND_PARAMETER and not k.startswith(K8S_PARAMETER_PREFIX)
        }
