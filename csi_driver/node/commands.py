"""Running the storage tools we do not reimplement (losetup, mkfs, resize2fs, cp...)."""

from __future__ import annotations

import os
import subprocess

from ..errors import Internal, ResourceExhausted

# strerror(ENOSPC) and strerror(EDQUOT) as the tools print them in the C locale (inodes running
# out is ENOSPC too); the tools run with LC_ALL=C so that these, and their output, are English.
_FULL = ("No space left on device", "Disk quota exceeded")
_ENV = {**os.environ, "LC_ALL": "C"}


def run(*argv: str, timeout: float = 600) -> str:
    """Run `argv`; its stdout, or Internal with the tool's own error text (ResourceExhausted
    when the tool ran out of space)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                              env=_ENV)
    except FileNotFoundError:
        raise Internal(f"{argv[0]} is not installed on this node") from None
    except subprocess.TimeoutExpired:
        raise Internal(f"{argv[0]} did not finish within {timeout:.0f}s") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        full = next((line for line in detail if any(m in line for m in _FULL)), None)
        if full is not None:
            raise ResourceExhausted(f"{' '.join(argv[:2])} failed: {full}")
        raise Internal(f"{' '.join(argv[:2])} failed: {detail[-1] if detail else done.returncode}")
    return done.stdout
