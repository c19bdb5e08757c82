"""Ceph RBD backend: images through librbd, attached on nodes with krbd, rbd-nbd or rbd-fuse."""

from .backend import RbdBackend
from .config import RbdConfig

__all__ = ["RbdBackend", "RbdConfig"]
