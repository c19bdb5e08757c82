"""hostPath backend: volumes as directories, filesystem images or raw block files on the node."""

from .backend import HostPathBackend
from .config import HostPathConfig

__all__ = ["HostPathBackend", "HostPathConfig"]
