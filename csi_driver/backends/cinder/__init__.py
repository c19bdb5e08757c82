"""OpenStack Cinder backend: volumes in Cinder, attached through Nova or Cinder attachments."""

from .backend import CinderBackend
from .config import CinderConfig

__all__ = ["CinderBackend", "CinderConfig"]
