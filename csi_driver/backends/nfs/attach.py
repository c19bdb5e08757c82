"""NFS on the node: a directory volume is an NFS mount of its own sub-directory; an image volume
a loop device on the share's image file (image.py). Both are told from the mount table alone,
since a stat of a mount whose server is gone can block."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Mapping

from ... import errors
from ...node import bounded, mounts
from ..base import Condition, NodeExpandRequest, NodeInfo, StageRequest
from . import share, volumes
from .access import Access
from .image import ImageAttacher
from .mount import mount_nfs

log = logging.getLogger(__name__)


class Attacher:
    def __init__(self, name: str, access: Access, node: NodeInfo) -> None:
        self.name = name
        self.access = access
        self.config = access.config
        self.node = node
        self.images = ImageAttacher(os.path.join(self.config.nodeStateDir, name),
                                    self.config.timeoutSeconds, node.node_id)

    def _stage_wait(self) -> float:
        return max(120.0, 6.0 * self.config.timeoutSeconds)

    def stage(self, request: StageRequest) -> None:
        local_id, capability = request.local_id, request.capability
        context = self._modified(local_id, request.context)
        server = context.get("server") or self.config.server
        export = context.get("share") or self.config.share
        sub_dir = context.get("subDir", "")
        if ".." in sub_dir.split("/"):
            raise errors.InvalidArgument(f"subDir {sub_dir!r} leaves the share")
        path = "/".join(p for p in (export.rstrip("/"), sub_dir.strip("/")) if p) or "/"
        options = [*self.config.mountOptions,
                   *(o for o in context.get("mountOptions", "").split(",") if o)]
        version = context.get("nfsVersion") or self.config.nfsVersion
        read_only = capability.read_only
        if context.get("volumeLayout") == volumes.IMAGE:
            # Bounded (losetup, blkid and mkfs on a server that stopped answering never
            # return); one at a time per volume, so a retry never races a stage still running.
            bounded.call(
                f"stage:{local_id}", self.images.stage, local_id, request.staging_path,
                capability, capability.fs_type or context.get("fsType") or self.config.fsType,
                lambda where: mount_nfs(server, path, where, version, options, False,
                                        self.config.timeoutSeconds),
                read_only, timeout=self._stage_wait())
            return
        if capability.block:
            raise errors.FailedPrecondition("a directory volume has no block device")
        if not os.path.isdir(request.staging_path):
            raise errors.FailedPrecondition(
                f"staging path {request.staging_path} is not a directory")
        for flag in capability.mount_flags:
            options += [o for o in flag.split(",") if o]
        mount_nfs(server, path, request.staging_path, version, options, read_only,
                  self.config.timeoutSeconds)

    def _modified(self, local_id: str, context: Mapping[str, str]) -> Mapping[str, str]:
        """The context with what ControllerModifyVolume changed since CreateVolume. The CO
        passes CreateVolume's context for ever and the node cannot ask the controller, so the
        node reads the volume's record from the share itself (one libnfs read)."""
        c = self.config
        if (not context.get("subDir")
                or (context.get("server", c.server), context.get("share", c.share))
                != (c.server, c.share)):
            return context  # a static PV of another export: no record of ours
        try:
            with self.access.conn() as conn:
                rec = share.volume_record(conn, local_id)
                if (context.get("volumeLayout") == volumes.IMAGE
                        and self.node.node_id not in share.attachments(conn, local_id)):
                    raise errors.FailedPrecondition(
                        f"the image volume is not published to node {self.node.node_id!r}: "
                        "ControllerPublishVolume comes first (an image is used by one node at "
                        "a time; the CSIDriver needs attachRequired: true)")
        except (ValueError, TypeError) as exc:  # not a record we can read: mount as made
            log.warning("backend %s: record of %s unreadable: %s", self.name, local_id, exc)
            return context
        if rec is None or rec.sub_dir != context["subDir"] or not rec.mutable:
            return context  # a static PV, or never modified
        return {**context, **rec.mutable}

    def unstage(self, local_id: str, staging_path: str) -> None:
        if bounded.busy(f"stage:{local_id}"):
            raise errors.Unavailable("a NodeStage of this volume has not finished yet (is the "
                                     "server answering?); retry")
        if self.images.is_image(local_id):
            self.images.unstage(local_id, staging_path)
        else:
            mounts.unmount(staging_path, wait=self.config.timeoutSeconds)

    def owns(self, local_id: str, path: str) -> bool:
        if self.images.is_image(local_id):
            return self.images.owns(local_id, path)
        # A directory volume's mount is an NFS mount of this backend's server.
        entry = mounts.mount_at(path)
        server = self.config.server
        host = f"[{server}]" if ":" in server else server
        return (entry is not None and entry.fs_type in ("nfs", "nfs4")
                and entry.source.startswith(f"{host}:"))

    def expand(self, request: NodeExpandRequest) -> int:
        if not self.images.is_image(request.local_id):
            return request.required  # a directory has no size of its own
        return int(bounded.call(f"expand:{request.local_id}", self.images.expand,
                                request.local_id, request.volume_path,
                                timeout=self._stage_wait()))

    def condition(self, local_id: str, volume_path: str) -> Condition:
        image = self.images.condition(local_id)
        if image is not None and image.abnormal:
            return image
        try:
            bounded.call(f"open:{volume_path}", mounts.touch_open, volume_path,
                         timeout=self.config.timeoutSeconds)
        except errors.Unavailable as exc:
            return Condition(True, str(exc))
        except OSError as exc:
            if exc.errno == errno.ESTALE:
                return Condition(True, f"stale NFS file handle at {volume_path}: the directory "
                                       "was removed or replaced on the server")
            return Condition(True, f"{volume_path}: {exc.strerror}")
        return Condition(False, "")
