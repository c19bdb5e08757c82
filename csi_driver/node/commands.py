"""Running the storage tools we do not reimplement (losetup, mkfs, resize2fs, cp...)."""

from __future__ import annotations

import subprocess

from ..errors import Internal


def run(*argv: str, timeout: float = 600) -> str:
    """Run `argv`; its stdout, or Internal with the tool's own error text."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise Internal(f"{argv[0]} is not installed on this node") from None
    except subprocess.TimeoutExpired:
        raise Internal(f"{argv[0]} did not finish within {timeout:.0f}s") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise Internal(f"{' '.join(argv[:2])} failed: {detail[-1] if detail else done.returncode}")
    return done.stdout
