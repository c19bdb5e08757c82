"""What a volume is asked to be: its access mode and capability, in plain Python types.

Shared by the services, the backends and the node helpers, so it imports nothing of ours: the
node layer can use it without loading the backend interface (or any backend).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class AccessMode(enum.IntEnum):
    # Values equal csi.v1.VolumeCapability.AccessMode.Mode so the services can convert directly.
    SINGLE_NODE_WRITER = 1
    SINGLE_NODE_READER_ONLY = 2
    MULTI_NODE_READER_ONLY = 3
    MULTI_NODE_SINGLE_WRITER = 4
    MULTI_NODE_MULTI_WRITER = 5
    SINGLE_NODE_SINGLE_WRITER = 6
    SINGLE_NODE_MULTI_WRITER = 7


SINGLE_NODE_MODES = frozenset(
    {
        AccessMode.SINGLE_NODE_WRITER,
        AccessMode.SINGLE_NODE_READER_ONLY,
        AccessMode.SINGLE_NODE_SINGLE_WRITER,
        AccessMode.SINGLE_NODE_MULTI_WRITER,
    }
)
READ_ONLY_MODES = frozenset({AccessMode.SINGLE_NODE_READER_ONLY,
                             AccessMode.MULTI_NODE_READER_ONLY})


@dataclass(frozen=True, slots=True)
class Capability:
    """One requested volume capability."""

    block: bool
    access_mode: AccessMode
    fs_type: str = ""
    mount_flags: tuple[str, ...] = ()

    @property
    def read_only(self) -> bool:
        """The access mode allows no writer: the one place that rule lives."""
        return self.access_mode in READ_ONLY_MODES
