"""Backend types: the built-in ones plus any registered under the `csi_driver.backends` entry point.

A third-party package adds a backend by declaring, in its pyproject.toml,
  [project.entry-points."csi_driver.backends"]
  mytype = "my_package.module:MyBackend"
where MyBackend subclasses csi_driver.backends.base.Backend.

Types are imported only when a configuration names them: importing this package (or the
interface in `base`) loads no backend, so a plug-in never pays for libnfs or librados.
"""

from __future__ import annotations

import functools
import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Backend

ENTRY_POINT_GROUP = "csi_driver.backends"
BUILTIN = {
    "hostpath": "csi_driver.backends.hostpath:HostPathBackend",
    "nfs": "csi_driver.backends.nfs:NfsBackend",
    "rbd": "csi_driver.backends.rbd:RbdBackend",
    "cinder": "csi_driver.backends.cinder:CinderBackend",
    "cephfs": "csi_driver.backends.cephfs:CephfsBackend",
}


def _plugins() -> dict[str, str]:
    """Plug-in types by name (module:attribute); built-in names cannot be replaced."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)
            if ep.name not in BUILTIN}


def type_names() -> list[str]:
    return sorted({*BUILTIN, *_plugins()})


@functools.cache
def backend_type(name: str) -> type[Backend[Any]] | None:
    """The class for a type name, imported now; None for a name nobody registered."""
    target = BUILTIN.get(name) or _plugins().get(name)
    if target is None:
        return None
    module, _, attr = target.partition(":")
    found: type[Backend[Any]] = getattr(importlib.import_module(module), attr)
    return found
