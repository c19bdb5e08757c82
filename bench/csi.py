"""A typed CSI client over one gRPC channel, and the request pieces the scenarios share.

The generated *Stub classes are untyped; building each call with `channel.unary_unary` keeps the
benchmark mypy --strict clean, and wrapping it lets every failure name the RPC that failed.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import grpc
from google.protobuf.message import Message

from csi_driver.csi import csi_pb2 as pb

MiB = 1 << 20
# Plain RPCs should answer in well under a second; the bound only stops a hung driver from hanging
# the benchmark. Snapshot and clone copy data, so they get longer.
DEFAULT_TIMEOUT_S = 60.0
COPY_TIMEOUT_S = 900.0

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


class RpcFailure(Exception):
    """A non-OK status from the driver, tagged with the RPC that returned it."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{method}: {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details

    @property
    def key(self) -> str:
        return f"{self.method} {self.code.name}"


class Rpc(Generic[Req, Resp]):
    def __init__(self, channel: grpc.Channel, service: str, method: str,
                 req_type: type[Req], resp_type: type[Resp]) -> None:
        self.method = method
        self._call: grpc.UnaryUnaryMultiCallable[Req, Resp] = channel.unary_unary(
            f"/csi.v1.{service}/{method}",
            request_serializer=req_type.SerializeToString,
            response_deserializer=resp_type.FromString,
        )

    def __call__(self, request: Req, timeout: float = DEFAULT_TIMEOUT_S) -> Resp:
        try:
            return self._call(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise RpcFailure(self.method, exc.code(), exc.details() or "") from None


class Csi:
    """Every RPC the benchmark uses, over one shared channel (gRPC multiplexes the threads)."""

    def __init__(self, socket_path: str) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")
        ch = self.channel
        self.get_plugin_info = Rpc(ch, "Identity", "GetPluginInfo",
                                   pb.GetPluginInfoRequest, pb.GetPluginInfoResponse)
        self.controller_capabilities = Rpc(
            ch, "Controller", "ControllerGetCapabilities",
            pb.ControllerGetCapabilitiesRequest, pb.ControllerGetCapabilitiesResponse)
        self.create_volume = Rpc(ch, "Controller", "CreateVolume",
                                 pb.CreateVolumeRequest, pb.CreateVolumeResponse)
        self.delete_volume = Rpc(ch, "Controller", "DeleteVolume",
                                 pb.DeleteVolumeRequest, pb.DeleteVolumeResponse)
        self.list_volumes = Rpc(ch, "Controller", "ListVolumes",
                                pb.ListVolumesRequest, pb.ListVolumesResponse)
        self.create_snapshot = Rpc(ch, "Controller", "CreateSnapshot",
                                   pb.CreateSnapshotRequest, pb.CreateSnapshotResponse)
        self.delete_snapshot = Rpc(ch, "Controller", "DeleteSnapshot",
                                   pb.DeleteSnapshotRequest, pb.DeleteSnapshotResponse)
        self.stage = Rpc(ch, "Node", "NodeStageVolume",
                         pb.NodeStageVolumeRequest, pb.NodeStageVolumeResponse)
        self.unstage = Rpc(ch, "Node", "NodeUnstageVolume",
                           pb.NodeUnstageVolumeRequest, pb.NodeUnstageVolumeResponse)
        self.publish = Rpc(ch, "Node", "NodePublishVolume",
                           pb.NodePublishVolumeRequest, pb.NodePublishVolumeResponse)
        self.unpublish = Rpc(ch, "Node", "NodeUnpublishVolume",
                             pb.NodeUnpublishVolumeRequest, pb.NodeUnpublishVolumeResponse)

    def close(self) -> None:
        self.channel.close()


def get_plugin_info_once(socket_path: str, timeout: float) -> bool:
    """One GetPluginInfo on a fresh channel.

    A fresh channel per try matters for start-up timing: a channel that failed to connect backs
    off for about a second before trying again, which would swamp the number being measured.
    """
    with grpc.insecure_channel(f"unix://{socket_path}") as channel:
        rpc = Rpc(channel, "Identity", "GetPluginInfo",
                  pb.GetPluginInfoRequest, pb.GetPluginInfoResponse)
        try:
            rpc(pb.GetPluginInfoRequest(), timeout=timeout)
        except RpcFailure:
            return False
        return True


def mount_cap() -> pb.VolumeCapability:
    return pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(),
        access_mode=pb.VolumeCapability.AccessMode(
            mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
    )


def create_request(name: str, size: int,
                   source: pb.VolumeContentSource | None = None) -> pb.CreateVolumeRequest:
    request = pb.CreateVolumeRequest(
        name=name,
        capacity_range=pb.CapacityRange(required_bytes=size),
        volume_capabilities=[mount_cap()],
    )
    if source is not None:
        request.volume_content_source.CopyFrom(source)
    return request
