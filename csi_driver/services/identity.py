"""CSI Identity service."""

from __future__ import annotations

import logging

import grpc
from google.protobuf.wrappers_pb2 import BoolValue

from .. import __version__
from ..backends.base import Expansion
from ..csi import csi_pb2 as pb
from ..csi import csi_pb2_grpc as pb_grpc
from ..errors import CsiError
from .plugin import Plugin

log = logging.getLogger(__name__)
_Service = pb.PluginCapability.Service.Type
_Expansion = pb.PluginCapability.VolumeExpansion.Type


class IdentityService(pb_grpc.IdentityServicer):
    def __init__(self, driver: Plugin, controller: bool) -> None:
        self.driver = driver
        self.controller = controller

    def GetPluginInfo(self, request: pb.GetPluginInfoRequest, context: grpc.ServicerContext
                      ) -> pb.GetPluginInfoResponse:
        return pb.GetPluginInfoResponse(name=self.driver.node.driver_name,
                                        vendor_version=__version__)

    def GetPluginCapabilities(self, request: pb.GetPluginCapabilitiesRequest,
                              context: grpc.ServicerContext) -> pb.GetPluginCapabilitiesResponse:
        services = []
        features = [b.features for b in self.driver.backends.values()]
        if self.controller:
            services.append(_Service.CONTROLLER_SERVICE)
            if any(f.group_snapshots for f in features):
                services.append(_Service.GROUP_CONTROLLER_SERVICE)
            if any(f.changed_blocks for f in features):
                services.append(_Service.SNAPSHOT_METADATA_SERVICE)
        if any(b.segments for b in self.driver.backends.values()):
            services.append(_Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)
        caps = [pb.PluginCapability(service=pb.PluginCapability.Service(type=s))
                for s in services]
        expansions = {f.expansion for f in features}
        if Expansion.ONLINE in expansions or Expansion.OFFLINE in expansions:
            kind = (_Expansion.ONLINE if Expansion.ONLINE in expansions else _Expansion.OFFLINE)
            caps.append(pb.PluginCapability(
                volume_expansion=pb.PluginCapability.VolumeExpansion(type=kind)))
        return pb.GetPluginCapabilitiesResponse(capabilities=caps)

    def Probe(self, request: pb.ProbeRequest, context: grpc.ServicerContext) -> pb.ProbeResponse:
        ready = True
        for name, backend in self.driver.backends.items():
            try:
                self.driver.ready(backend).probe()
            except CsiError as exc:
                log.warning("backend %s is not ready: %s", name, exc.message)
                ready = False
        return pb.ProbeResponse(ready=BoolValue(value=ready))
