"""ControllerPublish/Unpublish (a mixin of ControllerService): the attach step.

The CSI rules live here; a backend that attaches only records and makes attachments. A CSIDriver's
attachRequired is per driver, not per backend, so when any configured backend attaches, the CO
calls these for every volume: a backend that does not attach answers at once, with an empty
publish_context.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from .. import errors
from ..backends.base import NO_SECRETS, Attachment, Backend, Query, Secrets, Volume
from ..capability import SINGLE_NODE_MODES, AccessMode, Capability
from ..csi import csi_pb2 as pb
from ..ids import NODE_ID_RE
from . import capabilities, lookup
from .plugin import Plugin


def _refusal(wanted: Attachment, current: Sequence[Attachment]) -> errors.CsiError | None:
    """Why `wanted` may not join `current` (the volume's attachments), or None."""
    same = [a for a in current if a.node_id == wanted.node_id]
    if same:
        if same[0] == wanted:
            return None  # the same publish again: idempotent
        return errors.AlreadyExists(
            f"the volume is already published to node {wanted.node_id!r} with another "
            "capability or read-only setting; unpublish it first")
    others = [a for a in current if a.node_id != wanted.node_id]
    if not others:
        return None
    modes = {wanted.capability.access_mode, *(a.capability.access_mode for a in others)}
    if modes & SINGLE_NODE_MODES:
        return errors.FailedPrecondition(
            f"the volume is published to node {others[0].node_id!r} and its access mode allows "
            "one node at a time; unpublish it there first")
    def writes(a: Attachment) -> bool:
        return not (a.readonly or a.capability.read_only)

    if AccessMode.MULTI_NODE_SINGLE_WRITER in modes and writes(wanted) and any(
            writes(a) for a in others):
        return errors.FailedPrecondition(
            "the volume already has a writer on another node and its access mode allows one "
            "writer; publish it read-only")
    return None


class AttachRPCs:
    driver: Plugin

    def _existing(self, volume_id: str, *, secrets: Secrets
                  ) -> tuple[str, Backend[Any], Volume]:
        raise NotImplementedError  # ControllerService's

    def _offered(self, rpc: str) -> None:
        if not any(b.features.attach for b in self.driver.backends.values()):
            raise errors.Unimplemented(
                f"{rpc}: no configured backend attaches volumes (PUBLISH_UNPUBLISH_VOLUME is "
                "not advertised)")

    def _node(self, backend: Backend[Any], node_id: str, secrets: Secrets) -> None:
        if not NODE_ID_RE.fullmatch(node_id) or not backend.node_known(node_id,
                                                                         secrets=secrets):
            raise errors.NotFound(
                f"node {node_id!r} is not known to backend {backend.name!r}: no node service "
                "of this driver has registered under that ID (it does at NodeGetInfo)")

    def _limits(self, backend: Backend[Any]) -> list[tuple[int, str, list[Backend[Any]]]]:
        """(limit, whose, the backends whose volumes count) for the node limits that apply."""
        found = [(backend.config.maxVolumesPerNode, f"backend {backend.name!r}", [backend]),
                 (self.driver.max_volumes_per_node, "the driver",
                  [b for b in self.driver.backends.values() if b.features.attach])]
        return [row for row in found if row[0]]

    def _room(self, backend: Backend[Any], node_id: str, secrets: Secrets) -> None:
        """RESOURCE_EXHAUSTED when the node already holds as many volumes as the backend's
        maxVolumesPerNode, or the driver's, allows (what NodeGetInfo told the CO)."""
        for limit, whose, counted in self._limits(backend):
            held = sum(1 for b in counted
                       for v in self.driver.ready(b).list_volumes(
                           Query(secrets=secrets if b is backend else NO_SECRETS))
                       if any(a.node_id == node_id for a in v.published))
            if held >= limit:
                raise errors.ResourceExhausted(
                    f"node {node_id!r} already has {held} volumes published, the most {whose} "
                    f"allows (maxVolumesPerNode: {limit}); unpublish one first")

    def ControllerPublishVolume(self, request: pb.ControllerPublishVolumeRequest,
                                context: grpc.ServicerContext
                                ) -> pb.ControllerPublishVolumeResponse:
        self._offered("ControllerPublishVolume")
        if not request.volume_id:
            raise errors.InvalidArgument("volume_id is required")
        if not request.node_id:
            raise errors.InvalidArgument("node_id is required")
        if not request.HasField("volume_capability"):
            raise errors.InvalidArgument("volume_capability is required")
        cap: Capability = capabilities.from_pb(request.volume_capability)
        found = self.driver.backend_for_id(request.volume_id, start=False)
        # With a node limit, publishes to one node go one at a time, so two cannot both pass
        # the count (the second gets ABORTED and is retried).
        node_key = (f"node:{request.node_id}" if found and self._limits(found[1]) else "")
        with self.driver.locks.hold(f"id:{request.volume_id}", node_key):
            _, backend, volume = self._existing(request.volume_id, secrets=request.secrets)
            reason = capabilities.unsupported(backend, cap, volume.parameters)
            if reason or cap.block != volume.block:
                raise errors.InvalidArgument(reason or (
                    f"the volume is {'raw block' if volume.block else 'a filesystem'}; it "
                    f"cannot be published as {'block' if cap.block else 'a mount'}"))
            if not backend.features.attach:
                return pb.ControllerPublishVolumeResponse()
            self._node(backend, request.node_id, request.secrets)
            wanted = Attachment(request.node_id, cap, request.readonly)
            refusal = _refusal(wanted, volume.published)
            if refusal is not None:
                raise refusal
            if not any(a.node_id == wanted.node_id for a in volume.published):
                self._room(backend, request.node_id, request.secrets)
            published = backend.attach(volume.local_id, wanted, secrets=request.secrets)
        return pb.ControllerPublishVolumeResponse(publish_context=dict(published))

    def ControllerUnpublishVolume(self, request: pb.ControllerUnpublishVolumeRequest,
                                  context: grpc.ServicerContext
                                  ) -> pb.ControllerUnpublishVolumeResponse:
        self._offered("ControllerUnpublishVolume")
        if not request.volume_id:
            raise errors.InvalidArgument("volume_id is required")
        # A volume or node we cannot find has nothing attached that we could know of: the spec
        # asks for OK then (csi-sanity's cleanup unpublishes volumes it has deleted).
        found = self.driver.backend_for_id(request.volume_id)
        if found is None or not found[1].features.attach:
            return pb.ControllerUnpublishVolumeResponse()
        parsed, backend = found
        with self.driver.locks.hold(f"id:{request.volume_id}"):
            if lookup.volume(backend, parsed.local, secrets=request.secrets,
                             condition=False) is None:
                return pb.ControllerUnpublishVolumeResponse()
            backend.detach(parsed.local, request.node_id, secrets=request.secrets)
        return pb.ControllerUnpublishVolumeResponse()
