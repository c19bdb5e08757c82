"""CephFS backend: volumes are subvolumes (the mgr volumes module), mounted on nodes with
ceph-fuse or the kernel client."""

from .backend import CephfsBackend
from .config import CephfsConfig

__all__ = ["CephfsBackend", "CephfsConfig"]
