"""CSI Node service: staging by the backend, publishing as a bind mount of the staged volume.

Every operation looks at the real mount table, so repeats and a driver restart with volumes still
mounted are safe.
"""

from __future__ import annotations

import os

import grpc

from .. import errors
from ..backends.base import AccessMode, Backend
from ..csi import csi_pb2 as pb
from ..csi import csi_pb2_grpc as pb_grpc
from ..driver import Driver
from ..ids import ObjectId
from ..node import mounts
from . import capabilities

_Cap = pb.NodeServiceCapability.RPC.Type


def _require(value: str, field: str) -> None:
    if not value:
        raise errors.InvalidArgument(f"{field} is required")


class NodeService(pb_grpc.NodeServicer):
    def __init__(self, driver: Driver) -> None:
        self.driver = driver

    def _volume(self, volume_id: str) -> tuple[ObjectId, Backend]:
        found = self.driver.backend_for_id(volume_id)
        if found is None:
            raise errors.NotFound(f"volume {volume_id!r} is not a volume of this driver")
        return found

    def NodeStageVolume(self, request: pb.NodeStageVolumeRequest, context: grpc.ServicerContext
                        ) -> pb.NodeStageVolumeResponse:
        _require(request.volume_id, "volume_id")
        _require(request.staging_target_path, "staging_target_path")
        if not request.HasField("volume_capability"):
            raise errors.InvalidArgument("volume_capability is required")
        cap = capabilities.from_pb(request.volume_capability)
        parsed, backend = self._volume(request.volume_id)
        capabilities.require_supported(backend, [cap])
        with self.driver.locks.hold(f"id:{request.volume_id}"):
            backend.stage(parsed.local, request.staging_target_path, cap,
                          dict(request.volume_context))
        return pb.NodeStageVolumeResponse()

    def NodeUnstageVolume(self, request: pb.NodeUnstageVolumeRequest,
                          context: grpc.ServicerContext) -> pb.NodeUnstageVolumeResponse:
        _require(request.volume_id, "volume_id")
        _require(request.staging_target_path, "staging_target_path")
        parsed, backend = self._volume(request.volume_id)
        with self.driver.locks.hold(f"id:{request.volume_id}"):
            backend.unstage(parsed.local, request.staging_target_path)
        return pb.NodeUnstageVolumeResponse()

    def NodePublishVolume(self, request: pb.NodePublishVolumeRequest,
                          context: grpc.ServicerContext) -> pb.NodePublishVolumeResponse:
        _require(request.volume_id, "volume_id")
        _require(request.target_path, "target_path")
        if not request.HasField("volume_capability"):
            raise errors.InvalidArgument("volume_capability is required")
        _require(request.staging_target_path, "staging_target_path")
        cap = capabilities.from_pb(request.volume_capability)
        parsed, backend = self._volume(request.volume_id)
        capabilities.require_supported(backend, [cap])
        read_only = request.readonly or cap.access_mode in (
            AccessMode.SINGLE_NODE_READER_ONLY, AccessMode.MULTI_NODE_READER_ONLY)
        flags = mounts.bind_flags(cap.mount_flags, read_only)
        with self.driver.locks.hold(f"id:{request.volume_id}"):
            staged = mounts.mount_at(request.staging_target_path)
            if staged is None or not backend.owns_mount(parsed.local, request.staging_target_path):
                raise errors.FailedPrecondition(
                    f"volume {request.volume_id!r} is not staged at {request.staging_target_path}; "
                    "call NodeStageVolume first"
                )
            mounts.ensure_bind(request.staging_target_path, request.target_path, flags,
                               make="file" if cap.block else "dir")
        return pb.NodePublishVolumeResponse()

    def NodeUnpublishVolume(self, request: pb.NodeUnpublishVolumeRequest,
                            context: grpc.ServicerContext) -> pb.NodeUnpublishVolumeResponse:
        _require(request.volume_id, "volume_id")
        _require(request.target_path, "target_path")
        with self.driver.locks.hold(f"id:{request.volume_id}"):
            mounts.unmount(request.target_path)
            # We created the target at publish; the spec makes removing it our job too.
            try:
                if os.path.isdir(request.target_path):
                    os.rmdir(request.target_path)
                else:
                    os.unlink(request.target_path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise errors.Internal(
                    f"could not remove target path {request.target_path}: {exc.strerror}"
                ) from exc
        return pb.NodeUnpublishVolumeResponse()

    def NodeGetVolumeStats(self, request: pb.NodeGetVolumeStatsRequest,
                           context: grpc.ServicerContext) -> pb.NodeGetVolumeStatsResponse:
        _require(request.volume_id, "volume_id")
        _require(request.volume_path, "volume_path")
        parsed, backend = self._volume(request.volume_id)
        path = request.volume_path
        if not os.path.exists(path):
            raise errors.NotFound(f"volume_path {path} does not exist")
        if mounts.mount_at(path) is None or not backend.owns_mount(parsed.local, path):
            raise errors.NotFound(f"volume {request.volume_id!r} is not mounted at {path}")
        st = os.statvfs(path)
        unit = pb.VolumeUsage.Unit
        return pb.NodeGetVolumeStatsResponse(
            usage=[
                pb.VolumeUsage(
                    unit=unit.BYTES,
                    total=st.f_blocks * st.f_frsize,
                    available=st.f_bavail * st.f_frsize,
                    used=(st.f_blocks - st.f_bfree) * st.f_frsize,
                ),
                pb.VolumeUsage(
                    unit=unit.INODES,
                    total=st.f_files,
                    available=st.f_favail,
                    used=st.f_files - st.f_ffree,
                ),
            ]
        )

    def NodeGetCapabilities(self, request: pb.NodeGetCapabilitiesRequest,
                            context: grpc.ServicerContext) -> pb.NodeGetCapabilitiesResponse:
        wanted = [_Cap.STAGE_UNSTAGE_VOLUME, _Cap.GET_VOLUME_STATS]
        if any(AccessMode.SINGLE_NODE_MULTI_WRITER in b.features.access_modes
               for b in self.driver.backends.values()):
            wanted.append(_Cap.SINGLE_NODE_MULTI_WRITER)
        return pb.NodeGetCapabilitiesResponse(
            capabilities=[pb.NodeServiceCapability(rpc=pb.NodeServiceCapability.RPC(type=t))
                          for t in wanted]
        )

    def NodeGetInfo(self, request: pb.NodeGetInfoRequest, context: grpc.ServicerContext
                    ) -> pb.NodeGetInfoResponse:
        node = self.driver.node
        return pb.NodeGetInfoResponse(
            node_id=node.node_id,
            max_volumes_per_node=self.driver.settings.max_volumes_per_node,
            accessible_topology=pb.Topology(segments={node.topology_key: node.node_id}),
        )
