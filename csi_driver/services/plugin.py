"""What the services need of the running driver: a narrow protocol, so they depend neither on
`driver.Driver` nor on the config file's shape (driver.Driver satisfies it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from ..backends.base import Backend, NodeInfo
from ..ids import ObjectId
from ..locks import KeyedLocks


class Plugin(Protocol):
    @property
    def node(self) -> NodeInfo: ...

    @property
    def backends(self) -> Mapping[str, Backend[Any]]: ...

    @property
    def locks(self) -> KeyedLocks: ...

    @property
    def kubelet_dir(self) -> str: ...

    @property
    def max_volumes_per_node(self) -> int: ...

    def ready(self, backend: Backend[Any]) -> Backend[Any]:
        """The backend, its start-up hook run (raises while it cannot start)."""

    def backend_for_parameters(self, parameters: Mapping[str, str]
                               ) -> tuple[str, Backend[Any]]: ...

    def backend_for_id(self, raw_id: str, start: bool = True
                       ) -> tuple[ObjectId, Backend[Any]] | None: ...
