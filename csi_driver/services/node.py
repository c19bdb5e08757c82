"""CSI Node service: staging by the backend, publishing as a bind mount of the staged volume.

Every operation looks at the real mount table, so repeats and a driver restart with volumes still
mounted are safe.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from typing import Any

import grpc

from .. import errors
from ..backends.base import (
    AccessMode,
    Backend,
    Capability,
    Expansion,
    NodeExpandRequest,
    StageRequest,
)
from ..csi import csi_pb2 as pb
from ..csi import csi_pb2_grpc as pb_grpc
from ..ids import ObjectId
from ..node import bounded, devices, mounts, paths
from . import capabilities, convert
from .plugin import Plugin

log = logging.getLogger(__name__)
_Cap = pb.NodeServiceCapability.RPC.Type
# Modes that allow one published writer on the node (Kubernetes ReadWriteOncePod).
EXCLUSIVE_MODES = (AccessMode.SINGLE_NODE_WRITER, AccessMode.SINGLE_NODE_SINGLE_WRITER)


def _require(value: str, field: str) -> None:
    if not value:
        raise errors.InvalidArgument(f"{field} is required")


def _capability(message: pb.VolumeCapability, backend: Backend[Any]) -> Capability:
    cap = capabilities.from_pb(message)
    reason = capabilities.unsupported(backend, cap)
    if reason:  # the spec's "exceeds capabilities" row for the node RPCs
        raise errors.FailedPrecondition(reason)
    return cap


STATS_WAIT = 5.0
PUBLISH_WAIT = 15.0


def _stats(path: str) -> tuple[int, os.statvfs_result]:
    return os.stat(path).st_mode, os.statvfs(path)


def _stale(path: str) -> bool:
    """Whether the filesystem at `path` answers ESTALE (its directory was replaced on the
    server) or ENOTCONN (its FUSE daemon died); a path that does not answer at all counts as
    not stale here."""
    try:
        bounded.call(f"stale:{path}", mounts.touch_open, path, timeout=STATS_WAIT)
    except OSError as exc:
        # ENOTCONN: the FUSE daemon behind the mount (ceph-fuse) is gone.
        return exc.errno in (errno.ESTALE, errno.ENOTCONN)
    except errors.Unavailable:
        return False
    return False


def _not_ours(volume_id: str, path: str, entry: mounts.MountEntry) -> errors.CsiError:
    return errors.FailedPrecondition(
        f"{path} is mounted with something that does not show volume {volume_id!r} "
        f"({entry.fs_type} from {entry.source or '?'}); the node leaves mounts it cannot tell "
        "are the volume's alone: unmount it by hand if it is a broken mount of this volume")


class NodeService(pb_grpc.NodeServicer):
    def __init__(self, driver: Plugin) -> None:
        self.driver = driver
        self.kubelet = paths.KubeletDir.of(driver.kubelet_dir)
        self._registered: set[str] = set()  # backends this node has registered with
        self._retrying: set[str] = set()
        self._register_lock = threading.Lock()

    def _register(self, backend: Backend[Any]) -> None:
        """Start `backend`, which on a node registers the node with it, bounded: a backend
        that does not answer must not hold NodeGetInfo (and the node's other backends)."""
        bounded.call(f"register:{backend.name}", self.driver.ready, backend,
                     timeout=_REGISTER_WAIT)
        self._registered.add(backend.name)

    def _register_later(self, backend: Backend[Any]) -> None:
        """Keep trying to register this node with `backend`, in one thread per backend."""
        with self._register_lock:
            if backend.name in self._retrying:
                return
            self._retrying.add(backend.name)

        def retry() -> None:
            while backend.name not in self._registered:
                time.sleep(_REGISTER_RETRY)
                try:
                    self._register(backend)
                except errors.CsiError:
                    continue
                log.info("backend %s: node %s registered", backend.name,
                         self.driver.node.node_id)
            with self._register_lock:
                self._retrying.discard(backend.name)

        threading.Thread(target=retry, name=f"register {backend.name}", daemon=True).start()

    def _path(self, path: str, field: str, lookup: bool = False) -> str:
        _require(path, field)
        return paths.check(path, field, self.kubelet, lookup)

    def _staging_dir(self, path: str) -> str:
        """The staging path, which the CO creates: an existing directory of its own."""
        staging = self._path(path, "staging_target_path")
        mode = paths.lmode(staging) if mounts.mount_at(staging) is None else stat.S_IFDIR
        if mode is None:
            raise errors.FailedPrecondition(
                f"staging_target_path {staging} does not exist; the CO creates it before "
                "NodeStageVolume")
        if not stat.S_ISDIR(mode):
            raise errors.FailedPrecondition(f"staging_target_path {staging} is not a directory")
        return staging

    def _foreign_stage(self, volume_id: str, local_id: str, backend: Backend[Any], staging: str
                       ) -> None:
        """Refuse to stage onto, or unstage, a mount at the staging path (or at its block
        device file) that is not the volume's."""
        for path in (staging, devices.block_target(staging)):
            entry = mounts.mount_at(path)
            if entry is not None:
                if not backend.owns_mount(local_id, path):
                    raise _not_ours(volume_id, path, entry)
                return  # inside a staged filesystem, "device" is the user's file

    def _volume(self, volume_id: str) -> tuple[ObjectId, Backend[Any]]:
        # Not started here: unstage and unpublish must work while the storage is away.
        found = self.driver.backend_for_id(volume_id, start=False)
        if found is None:
            raise errors.NotFound(f"volume {volume_id!r} is not a volume of this driver")
        return found

    def _mounted(self, volume_id: str, path: str) -> mounts.MountEntry | None:
        """The mount at `path`, if any; NOT_FOUND when nothing is mounted and the volume does
        not exist, as the spec's tables ask. Whether the mount is the volume's is the caller's
        question (one that is not is left alone)."""
        entry = mounts.mount_at(path)
        if entry is not None:
            return entry
        found = self.driver.backend_for_id(volume_id, start=False)
        if found is None or not found[1].owns_mount(found[0].local, None):
            raise errors.NotFound(f"volume {volume_id!r} does not exist")
        return None

    def NodeStageVolume(self, request: pb.NodeStageVolumeRequest, context: grpc.ServicerContext
                        ) -> pb.NodeStageVolumeResponse:
        _require(request.volume_id, "volume_id")
        _require(request.staging_target_path, "staging_target_path")
        if not request.HasField("volume_capability"):
            raise errors.InvalidArgument("volume_capability is required")
        parsed, backend = self._volume(request.volume_id)
        cap = _capability(request.volume_capability, backend)
        staging = self._staging_dir(request.staging_target_path)
        with self.driver.locks.hold(f"id:{request.volume_id}"):
            self._foreign_stage(request.volume_id, parsed.local, backend, staging)
            source = _staged_source(staging, cap)
            if mounts.mount_at(source) is not None and backend.owns_mount(parsed.local, source):
                return pb.NodeStageVolumeResponse()  # staged already: NodeStage is idempotent
            backend.stage(_stage_request(request, parsed.local, staging, cap))
        return pb.NodeStageVolumeResponse()

    def NodeUnstageVolume(self, request: pb.NodeUnstageVolumeRequest,
                          context: grpc.ServicerContext) -> pb.NodeUnstageVolumeResponse:
        _require(request.volume_id, "volume_id")
        staging = self._path(request.staging_target_path, "staging_target_path")
        parsed, backend = self._volume(request.volume_id)
        with self.driver.locks.hold(f"id:{request.volume_id}"):
            self._mounted(request.volume_id, staging)
            self._foreign_stage(request.volume_id, parsed.local, backend, staging)
            backend.unstage(parsed.local, staging)
        return pb.NodeUnstageVolumeResponse()

    def NodePublishVolume(self, request: pb.NodePublishVolumeRequest,
                          context: grpc.ServicerContext) -> pb.NodePublishVolumeResponse:
        _require(request.volume_id, "volume_id")
        target = self._path(request.target_path, "target_path")
        if not request.HasField("volume_capability"):
            raise errors.InvalidArgument("volume_capability is required")
        parsed, backend = self._volume(request.volume_id)
        cap = _capability(request.volume_capability, backend)
        if not request.staging_target_path:
            raise errors.FailedPrecondition(
                "staging_target_path is not set; this driver stages volumes first"
            )
        staging = self._path(request.staging_target_path, "staging_target_path")
        if not backend.owns_mount(parsed.local, None):
            raise errors.NotFound(f"volume {request.volume_id!r} does not exist")
        with self.driver.locks.hold(f"id:{request.volume_id}"):
            source = _staged_source(staging, cap)
            self._recover_stale(request, staging, target, parsed.local, backend, cap, source)
            text = mounts.read_mountinfo()
            staged = mounts.mount_at(source, text)
            if staged is None or not backend.owns_mount(parsed.local, source):
                raise errors.FailedPrecondition(
                    f"volume {request.volume_id!r} is not staged at {staging}; "
                    "call NodeStageVolume first"
                )
            read_only = (request.readonly or staged.read_only
                         or cap.read_only)
            if cap.access_mode in EXCLUSIVE_MODES and not read_only:
                self._check_exclusive(text, staged, source, target)
            flags = mounts.bind_flags(cap.mount_flags, read_only)
            if mounts.mount_at(target, text) is None:
                if paths.lmode(target) is None:
                    paths.make_target(target, cap.block, request.volume_id)
                else:
                    paths.usable_target(target, cap.block)
            # Bounded: binding (or comparing) a network filesystem whose server is gone blocks.
            bounded.call(f"publish:{target}", mounts.ensure_bind, source, target, flags,
                         "file" if cap.block else "dir", text, timeout=PUBLISH_WAIT)
        return pb.NodePublishVolumeResponse()

    @staticmethod
    def _recover_stale(request: pb.NodePublishVolumeRequest, staging: str, target: str,
                       local_id: str, backend: Backend[Any], cap: Capability, source: str
                       ) -> None:
        """Remount what answers ESTALE: a stale target is unmounted (publish binds it again),
        a stale staging mount is unstaged and staged again first. Kubelet republishes
        after a restart; without this the pod would keep an unusable volume for ever. Only a
        network filesystem's server can replace a directory under a mount: a local one is not
        opened (that is two bounded calls per publish)."""
        text = mounts.read_mountinfo()
        staged = mounts.mount_at(staging, text)
        at_target = mounts.mount_at(target, text) if target != source else None
        if staged is not None and mounts.is_network(staged) and _stale(staging):
            problem = backend.restage_problem(request.secrets)
            if problem:
                raise errors.FailedPrecondition(
                    f"the staging mount {staging} no longer answers (its client is gone) and "
                    f"cannot be mounted again here: {problem}")
            log.warning("volume %s: staging mount %s is stale; remounting", request.volume_id,
                        staging)
            if mounts.mount_at(target) is not None:
                mounts.unmount(target, wait=STATS_WAIT)
            backend.unstage(local_id, staging)
            backend.stage(_stage_request(request, local_id, staging, cap))
        elif at_target is not None and mounts.is_network(at_target) and _stale(target):
            log.warning("volume %s: target %s is stale; publishing again", request.volume_id,
                        target)
            mounts.unmount(target, wait=STATS_WAIT)

    @staticmethod
    def _check_exclusive(text: str, staged: mounts.MountEntry, source: str, target: str) -> None:
        """Refuse a second writer of a single-writer volume (the spec's FAILED_PRECONDITION)."""
        real = {mounts.resolve(source), mounts.resolve(target)}
        for entry in mounts.entries_naming(text, staged.root):
            if (entry.device == staged.device and entry.root == staged.root
                    and entry.mount_point not in real and not entry.read_only
                    and entry.mount_id != staged.mount_id):
                raise errors.FailedPrecondition(
                    f"the volume is already published for writing at {entry.mount_point} and its "
                    "access mode allows one writer"
                )

    def NodeUnpublishVolume(self, request: pb.NodeUnpublishVolumeRequest,
                            context: grpc.ServicerContext) -> pb.NodeUnpublishVolumeResponse:
        _require(request.volume_id, "volume_id")
        target = self._path(request.target_path, "target_path")
        with self.driver.locks.hold(f"id:{request.volume_id}"):
            entry = self._mounted(request.volume_id, target)
            if entry is not None:
                parsed, backend = self._volume(request.volume_id)  # an unknown ID owns nothing
                if not backend.owns_mount(parsed.local, target):
                    raise _not_ours(request.volume_id, target, entry)
                mounts.unmount(target)
            # What publish made there, and nothing else, is ours to remove.
            if not paths.remove_own(target, request.volume_id):
                log.warning("volume %s: left %s in place: publish did not make it (or it is "
                            "no longer empty)", request.volume_id, target)
        return pb.NodeUnpublishVolumeResponse()

    def _published(self, volume_id: str, path: str, strict: bool = True
                   ) -> tuple[ObjectId, Backend[Any], str]:
        """The volume mounted at `path`; `strict=False` lets a mount that no longer shows the
        volume through (its condition then says what is wrong)."""
        _require(volume_id, "volume_id")
        path = self._path(path, "volume_path", lookup=True)
        parsed, backend = self._volume(volume_id)
        # The mount table first: a stat of a mounted path can hang on a dead NFS server.
        mounted = mounts.mount_at(path) is not None
        if not mounted and not os.path.exists(path):
            raise errors.NotFound(f"volume_path {path} does not exist")
        if not mounted or not backend.owns_mount(parsed.local, None) or (
                strict and not backend.owns_mount(parsed.local, path)):
            raise errors.NotFound(f"volume {volume_id!r} is not mounted at {path}")
        return parsed, backend, path

    def NodeGetVolumeStats(self, request: pb.NodeGetVolumeStatsRequest,
                           context: grpc.ServicerContext) -> pb.NodeGetVolumeStatsResponse:
        parsed, backend, path = self._published(request.volume_id, request.volume_path,
                                                strict=not self._reports_conditions())
        unit = pb.VolumeUsage.Unit
        response = pb.NodeGetVolumeStatsResponse()
        try:
            st_mode, st = bounded.call(f"stats:{path}", _stats, path, timeout=STATS_WAIT)
        except (errors.Unavailable, OSError) as exc:
            # No usage from a volume that does not answer; its condition says why.
            if not backend.features.volume_condition:
                raise errors.Unavailable(f"{path}: {exc}") from exc
            response.volume_condition.CopyFrom(
                convert.condition_pb(backend.node_condition(parsed.local, path)))
            if not response.volume_condition.abnormal:
                response.volume_condition.abnormal = True
                response.volume_condition.message = str(exc)
            return response
        if stat.S_ISBLK(st_mode):
            response.usage.append(pb.VolumeUsage(unit=unit.BYTES, total=devices.device_size(path)))
        else:
            total, used = (backend.node_usage(parsed.local, path)
                           or (st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize))
            response.usage.append(
                pb.VolumeUsage(unit=unit.BYTES, total=total,
                               available=max(0, min(total - used, st.f_bavail * st.f_frsize)),
                               used=used))
            # Inode figures only where the filesystem has them (ceph-fuse reports nonsense:
            # 1 total, 2 used).
            if 0 <= st.f_ffree <= st.f_files and 0 <= st.f_favail <= st.f_files:
                response.usage.append(
                    pb.VolumeUsage(unit=unit.INODES, total=st.f_files, available=st.f_favail,
                                   used=st.f_files - st.f_ffree))
        if backend.features.volume_condition:
            response.volume_condition.CopyFrom(
                convert.condition_pb(backend.node_condition(parsed.local, path)))
        return response

    def _reports_conditions(self) -> bool:
        return any(b.features.volume_condition for b in self.driver.backends.values())

    def NodeExpandVolume(self, request: pb.NodeExpandVolumeRequest,
                         context: grpc.ServicerContext) -> pb.NodeExpandVolumeResponse:
        parsed, backend, path = self._published(request.volume_id, request.volume_path)
        staging = (self._path(request.staging_target_path, "staging_target_path")
                   if request.staging_target_path else "")
        if backend.features.expansion is Expansion.NONE:
            raise errors.InvalidArgument(f"backend {parsed.backend!r} cannot expand volumes")
        with self.driver.locks.hold(f"id:{request.volume_id}"):
            size = backend.node_expand(NodeExpandRequest(
                local_id=parsed.local, volume_path=path, staging_path=staging,
                required=request.capacity_range.required_bytes, secrets=request.secrets))
        return pb.NodeExpandVolumeResponse(capacity_bytes=size)

    def NodeGetCapabilities(self, request: pb.NodeGetCapabilitiesRequest,
                            context: grpc.ServicerContext) -> pb.NodeGetCapabilitiesResponse:
        features = [b.features for b in self.driver.backends.values()]
        wanted = [_Cap.STAGE_UNSTAGE_VOLUME, _Cap.GET_VOLUME_STATS]
        if any(AccessMode.SINGLE_NODE_MULTI_WRITER in f.access_modes for f in features):
            wanted.append(_Cap.SINGLE_NODE_MULTI_WRITER)
        if any(f.expansion is not Expansion.NONE for f in features):
            wanted.append(_Cap.EXPAND_VOLUME)
        if any(f.volume_condition for f in features):
            wanted.append(_Cap.VOLUME_CONDITION)
        return pb.NodeGetCapabilitiesResponse(
            capabilities=[pb.NodeServiceCapability(rpc=pb.NodeServiceCapability.RPC(type=t))
                          for t in wanted]
        )

    def NodeGetInfo(self, request: pb.NodeGetInfoRequest, context: grpc.ServicerContext
                    ) -> pb.NodeGetInfoResponse:
        node = self.driver.node
        # Kubelet asks this once it registers the plugin, before any ControllerPublish: the
        # controller of a backend that attaches learns here that the node exists. A backend
        # that does not answer must not keep the node (and its other backends) unregistered:
        # it is retried in the background.
        for backend in self.driver.backends.values():
            if backend.features.attach and backend.name not in self._registered:
                try:
                    self._register(backend)
                except errors.CsiError as exc:
                    log.warning("backend %s: node %s not registered yet (%s); retrying in the "
                                "background", backend.name, node.node_id, exc.message)
                    self._register_later(backend)
        # The node's own segments for every key a backend places volumes by (its zone, say),
        # and always the node itself.
        keys = {k for b in self.driver.backends.values() for k in b.topology_keys}
        learned = {k: v for b in self.driver.backends.values()
                   for k, v in b.node_segments().items()}
        segments = {k: v for k, v in {**learned, **node.segments}.items() if k in keys}
        return pb.NodeGetInfoResponse(
            node_id=node.node_id,
            max_volumes_per_node=self._max_volumes(),
            accessible_topology=pb.Topology(
                segments={**segments, node.topology_key: node.node_id}),
        )

    def _max_volumes(self) -> int:
        """The driver's maxVolumesPerNode; without one, the sum of the backends' when every
        backend attaches and has one (a backend without a limit makes the node's unlimited)."""
        if self.driver.max_volumes_per_node:
            return self.driver.max_volumes_per_node
        limits = [b.config.maxVolumesPerNode if b.features.attach else 0
                  for b in self.driver.backends.values()]
        return sum(limits) if all(limits) else 0


_REGISTER_WAIT = 5.0  # seconds NodeGetInfo waits for a backend's node registration
_REGISTER_RETRY = 10.0


def _stage_request(request: pb.NodeStageVolumeRequest | pb.NodePublishVolumeRequest,
                   local_id: str, staging: str, cap: Capability) -> StageRequest:
    return StageRequest(local_id=local_id, staging_path=staging, capability=cap,
                        context=dict(request.volume_context),
                        publish_context=dict(request.publish_context), secrets=request.secrets)


def _staged_source(staging: str, cap: Capability) -> str:
    """Where a staged volume is: the staging directory, or for block access the device node
    bind-mounted on <staging>/device (what NodePublish binds onward)."""
    return devices.block_target(staging) if cap.block else staging
