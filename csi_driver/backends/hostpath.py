"""hostPath backend: each volume is a directory on the node's own filesystem.

Layout under `path` (crash-safe: a volume exists exactly when its directory under `volumes/` does):
  volumes/<id>/meta.json   name, size, parameters
  volumes/<id>/data/       what the pod sees
  .tmp/                    volumes being created; renamed into volumes/ when complete
  .trash/                  volumes being deleted; renamed out of volumes/ first
Leftovers in .tmp and .trash (from a crash) are removed when the backend starts.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterator, Mapping

from pydantic import field_validator

from .. import errors, ids
from ..node import mounts
from ..quantity import parse_bytes
from .base import (
    SINGLE_NODE_MODES,
    Backend,
    BackendConfig,
    Capability,
    Capacity,
    Features,
    NodeInfo,
    Volume,
    VolumeRequest,
)


class HostPathConfig(BackendConfig):
    type: str = "hostpath"
    path: str
    # Total bytes this backend may hand out; default: the filesystem's free space.
    capacity: int | None = None
    defaultVolumeSize: int = 1 << 30

    @field_validator("capacity", "defaultVolumeSize", mode="before")
    @classmethod
    def _size(cls, value: int | str | None) -> int | None:
        return None if value is None else parse_bytes(value)

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not os.path.isabs(value):
            raise ValueError("must be an absolute path")
        return os.path.normpath(value)


class HostPathBackend(Backend):
    type_name = "hostpath"
    Config = HostPathConfig
    features = Features(access_modes=SINGLE_NODE_MODES, node_local=True)

    def __init__(self, name: str, config: BackendConfig, node: NodeInfo) -> None:
        super().__init__(name, config, node)
        assert isinstance(config, HostPathConfig)
        self.config = config
        self.default_volume_size = config.defaultVolumeSize
        self.root = config.path
        self.volumes_dir = os.path.join(self.root, "volumes")
        self.tmp_dir = os.path.join(self.root, ".tmp")
        self.trash_dir = os.path.join(self.root, ".trash")
        self._sizes: dict[str, int] = {}
        self._sizes_lock = threading.Lock()
        self._ready = False

    # -- paths ---------------------------------------------------------------------------
    def _volume_dir(self, local_id: str) -> str:
        # local_id was validated by ids.parse: one safe path component.
        return os.path.join(self.volumes_dir, local_id)

    def data_dir(self, local_id: str) -> str:
        return os.path.join(self.volumes_dir, local_id, "data")

    # -- identity ------------------------------------------------------------------------
    def probe(self) -> None:
        if not self._ready:
            self._start()
        if not os.access(self.volumes_dir, os.W_OK):
            raise errors.Unavailable(
                f"hostpath backend {self.name!r}: {self.volumes_dir} is not writable"
            )

    def _start(self) -> None:
        try:
            for d in (self.volumes_dir, self.tmp_dir, self.trash_dir):
                os.makedirs(d, 0o711, exist_ok=True)
            for d in (self.tmp_dir, self.trash_dir):
                for leftover in os.listdir(d):
                    shutil.rmtree(os.path.join(d, leftover), ignore_errors=True)
        except OSError as exc:
            raise errors.Unavailable(
                f"hostpath backend {self.name!r} cannot use {self.root}: {exc.strerror}"
            ) from exc
        with self._sizes_lock:
            self._sizes = {v.local_id: v.size for v in self._scan()}
        self._ready = True

    # -- controller ----------------------------------------------------------------------
    def _read(self, local_id: str) -> Volume | None:
        try:
            with open(os.path.join(self._volume_dir(local_id), "meta.json"), "rb") as f:
                meta = json.load(f)
        except FileNotFoundError:
            return None
        return Volume(
            local_id=local_id,
            name=meta["name"],
            size=meta["size"],
            parameters=meta.get("parameters", {}),
        )

    def _scan(self) -> Iterator[Volume]:
        for local_id in sorted(os.listdir(self.volumes_dir)):
            volume = self._read(local_id)
            if volume is not None:
                yield volume

    def create_volume(self, request: VolumeRequest) -> Volume:
        self.probe()
        local_id = ids.local_id_for_name(request.name)
        existing = self._read(local_id)
        if existing is not None:
            return existing
        if request.size > self._available():
            raise errors.ResourceExhausted(
                f"hostpath backend {self.name!r} has {self._available()} bytes left; "
                f"{request.size} requested"
            )
        staging = os.path.join(self.tmp_dir, f"{local_id}.{uuid.uuid4().hex[:8]}")
        try:
            os.mkdir(staging, 0o711)
            os.mkdir(os.path.join(staging, "data"))
            # World-writable like other hostPath drivers: pods run as arbitrary users.
            os.chmod(os.path.join(staging, "data"), 0o777)
            meta = {"name": request.name, "size": request.size,
                    "parameters": dict(request.parameters)}
            with open(os.path.join(staging, "meta.json"), "w") as f:
                json.dump(meta, f)
            os.rename(staging, self._volume_dir(local_id))
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise errors.Internal(f"could not create volume directory: {exc.strerror}") from exc
        with self._sizes_lock:
            self._sizes[local_id] = request.size
        return Volume(local_id=local_id, name=request.name, size=request.size,
                      parameters=dict(request.parameters))

    def delete_volume(self, local_id: str) -> None:
        self.probe()
        doomed = os.path.join(self.trash_dir, f"{local_id}.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self._volume_dir(local_id), doomed)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise errors.Internal(f"could not delete volume {local_id}: {exc.strerror}") from exc
        with self._sizes_lock:
            self._sizes.pop(local_id, None)
        shutil.rmtree(doomed, ignore_errors=True)

    def get_volume(self, local_id: str) -> Volume | None:
        self.probe()
        return self._read(local_id)

    def list_volumes(self) -> Iterator[Volume]:
        self.probe()
        return self._scan()

    def _available(self) -> int:
        if self.config.capacity is not None:
            with self._sizes_lock:
                used = sum(self._sizes.values())
            return max(0, self.config.capacity - used)
        st = os.statvfs(self.volumes_dir)
        return st.f_bavail * st.f_frsize

    def capacity(self, parameters: Mapping[str, str]) -> Capacity:
        self.probe()
        available = self._available()
        return Capacity(available=available, maximum_volume_size=available)

    # -- node ----------------------------------------------------------------------------
    def stage(
        self, local_id: str, staging_path: str, capability: Capability, context: Mapping[str, str]
    ) -> None:
        source = self.data_dir(local_id)
        if not os.path.isdir(source):
            raise errors.NotFound(f"volume {self.name}:{local_id} does not exist on this node")
        mounts.ensure_bind(source, staging_path, 0)

    def unstage(self, local_id: str, staging_path: str) -> None:
        mounts.unmount(staging_path)

    def owns_mount(self, local_id: str, path: str) -> bool:
        return mounts.same_object(self.data_dir(local_id), path)
