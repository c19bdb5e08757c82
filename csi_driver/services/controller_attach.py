"""ControllerPublish/Unpublish (a mixin of ControllerService): the attach step.

The CSI rules live here; a backend that attaches only records and makes attachments. A CSIDriver's
attachRequired is per driver, not per backend, so when any configured backend attaches, the CO
calls these for every volume: a backend that does not attach answers at once, with an empty
publish_context.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from .. import errors
from ..backends.base import Attachment, Backend, Secrets, Volume
from ..capability import SINGLE_NODE_MODES, AccessMode, Capability
from ..config import NODE_ID_RE
from ..csi import csi_pb2 as pb
from ..driver import Driver
from . import capabilities


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
    driver: Driver

    def _existing(self, volume_id: str, *, secrets: Secrets) -> tuple[str, Backend, Volume]:
        raise NotImplementedError  # ControllerService's

    def _offered(self, rpc: str) -> None:
        if not any(b.features.attach for b in self.driver.backends.values()):
            raise errors.Unimplemented(
                f"{rpc}: no configured backend attaches volumes (PUBLISH_UNPUBLISH_VOLUME is "
                "not advertised)")

    def _node(self, backend: Backend, node_id: str, secrets: Secrets) -> None:
        if not NODE_ID_RE.fullmatch(node_id) or not backend.node_known(node_id,
                                                                         secrets=secrets):
            raise errors.NotFound(
                f"node {node_id!r} is not known to backend {backend.name!r}: no node service "
                "of this driver has registered under that ID (it does at NodeGetInfo)")

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
        with self.driver.locks.hold(f"id:{request.volume_id}"):
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
            refusal = _refusal(wanted, backend.attachments(volume.local_id,
                                                           secrets=request.secrets))
            if refusal is not None:
                raise refusal
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
            if backend.get_volume(parsed.local, secrets=request.secrets) is None:
                return pb.ControllerUnpublishVolumeResponse()
            backend.detach(parsed.local, request.node_id, secrets=request.secrets)
        return pb.ControllerUnpublishVolumeResponse()
