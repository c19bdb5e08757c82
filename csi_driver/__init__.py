"""Berth: a CSI driver with pluggable storage backends."""

__version__ = "0.1.0"
