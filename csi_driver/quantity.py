"""Byte quantities as Kubernetes writes them: `1Gi`, `500M`, `1073741824`."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
}
_RE = re.compile(r"^\s*(\d+)\s*(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P|)\s*$")


def parse_bytes(value: int | str) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a size such as 10Gi, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    match = _RE.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a size; use bytes or a suffix like 500Mi, 10Gi, 1T")
    return int(match.group(1)) * _UNITS[match.group(2)]
