"""One volume or snapshot by ID, through the backend's query (its interface has no `get`)."""

from __future__ import annotations

from typing import Any

from ..backends.base import Backend, Query, Secrets, Snapshot, Volume


def volume(backend: Backend[Any], local_id: str, *, secrets: Secrets, condition: bool = True
           ) -> Volume | None:
    query = Query(local_id=local_id, secrets=secrets, condition=condition)
    return next((v for v in backend.list_volumes(query) if v.local_id == local_id), None)


def snapshot(backend: Backend[Any], local_id: str, *, secrets: Secrets) -> Snapshot | None:
    return next((s for s in backend.list_snapshots(Query(local_id=local_id, secrets=secrets))
                 if s.local_id == local_id), None)
