"""Backend types: the built-in ones plus any registered under the `csi_driver.backends` entry point.

A third-party package adds a backend by declaring, in its pyproject.toml,
  [project.entry-points."csi_driver.backends"]
  mytype = "my_package.module:MyBackend"
where MyBackend subclasses csi_driver.backends.base.Backend.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from .base import Backend
from .hostpath import HostPathBackend
from .nfs import NfsBackend
from .rbd import RbdBackend

ENTRY_POINT_GROUP = "csi_driver.backends"
# The rbd module imports librados/librbd only when a cluster is used, so listing it costs nothing.
BUILTIN: dict[str, type[Backend]] = {
    "hostpath": HostPathBackend, "nfs": NfsBackend, "rbd": RbdBackend,
}


def backend_types() -> dict[str, type[Backend]]:
    """Every known backend type by name; built-in names cannot be replaced by a plug-in."""
    found: dict[str, type[Backend]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in BUILTIN:
            found[ep.name] = ep.load()
    found.update(BUILTIN)
    return found
