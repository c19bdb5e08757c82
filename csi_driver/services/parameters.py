"""StorageClass parameters: which are the driver's, which the provisioner's, which the backend's."""

from __future__ import annotations

from collections.abc import Mapping

from ..backends.base import Provisioner

# Added by the Kubernetes sidecars (PVC/PV names with --extra-create-metadata, fstype, secret
# references): never backend options.
K8S_PREFIX = "csi.storage.k8s.io/"
BACKEND = "backend"  # picks the backend when several are configured


def own(parameters: Mapping[str, str]) -> dict[str, str]:
    """The backend's own parameters: all but the driver's and the sidecars'."""
    return {k: v for k, v in parameters.items()
            if k != BACKEND and not k.startswith(K8S_PREFIX)}


def provisioner(parameters: Mapping[str, str]) -> Provisioner:
    return Provisioner(pvc_name=parameters.get(f"{K8S_PREFIX}pvc/name", ""),
                       pvc_namespace=parameters.get(f"{K8S_PREFIX}pvc/namespace", ""),
                       pv_name=parameters.get(f"{K8S_PREFIX}pv/name", ""))
