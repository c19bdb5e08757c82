"""max_entries/starting_token paging shared by ListVolumes and ListSnapshots."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import TypeVar

from .. import errors, ids

T = TypeVar("T")


def page(rows: Sequence[tuple[str, T]], max_entries: int, token: str
         ) -> tuple[list[T], str]:
    """One page of `rows` (sorted by ID) and the next token.

    The token is the ID of the next entry, so entries deleted between pages skip nothing; a token
    that is not an ID of ours was not issued by us: ABORTED, as the spec asks.
    """
    if max_entries < 0:
        raise errors.InvalidArgument("max_entries must not be negative")
    if token and ids.parse(token) is None:
        raise errors.Aborted(f"starting_token {token!r} was not issued by this driver")
    start = bisect.bisect_left([key for key, _ in rows], token) if token else 0
    end = start + max_entries if max_entries else len(rows)
    return [item for _, item in rows[start:end]], rows[end][0] if end < len(rows) else ""
