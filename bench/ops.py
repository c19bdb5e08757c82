"""CSI operations that keep a ledger of what exists, so one sweep at the end can undo whatever a
failed or interrupted scenario left behind, and a leak check can tell the driver's leftovers apart.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Mapping

from csi_driver.csi import csi_pb2 as pb

from .csi import COPY_TIMEOUT_S, DEFAULT_TIMEOUT_S, Csi, RpcFailure, create_request, mount_cap
from .measure import Measurement


class Ops:
    def __init__(self, csi: Csi, workdir: str, secrets: Mapping[str, str] | None = None) -> None:
        self.csi = csi
        # Sent with every controller request that has secrets and with NodeStageVolume, as the
        # sidecars and kubelet send a StorageClass's Secrets (empty: none, as for hostPath).
        self.secrets = dict(secrets or {})
        self.staging_root = os.path.join(workdir, "staging")
        self.pods_root = os.path.join(workdir, "pods")
        os.makedirs(self.staging_root, exist_ok=True)
        os.makedirs(self.pods_root, exist_ok=True)
        self._lock = threading.Lock()
        self.volumes: set[str] = set()
        self.snapshots: set[str] = set()
        self.staged: dict[str, str] = {}  # staging path -> volume id
        self.published: dict[str, str] = {}  # target path -> volume id
        # Driver behaviour that broke the spec without an error status, e.g. a target left behind.
        self.anomalies: Counter[str] = Counter()

    # -- controller ----------------------------------------------------------------------
    def create(self, name: str, size: int, source: pb.VolumeContentSource | None = None) -> str:
        timeout = COPY_TIMEOUT_S if source is not None else DEFAULT_TIMEOUT_S
        request = create_request(name, size, source)
        request.secrets.update(self.secrets)
        volume = self.csi.create_volume(request, timeout).volume
        with self._lock:
            self.volumes.add(volume.volume_id)
        return volume.volume_id

    def delete(self, volume_id: str) -> None:
        self.csi.delete_volume(pb.DeleteVolumeRequest(volume_id=volume_id, secrets=self.secrets))
        with self._lock:
            self.volumes.discard(volume_id)

    def snapshot(self, volume_id: str, name: str) -> pb.Snapshot:
        request = pb.CreateSnapshotRequest(source_volume_id=volume_id, name=name,
                                           secrets=self.secrets)
        snap = self.csi.create_snapshot(request, COPY_TIMEOUT_S).snapshot
        with self._lock:
            self.snapshots.add(snap.snapshot_id)
        return snap

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.csi.delete_snapshot(pb.DeleteSnapshotRequest(snapshot_id=snapshot_id,
                                                          secrets=self.secrets))
        with self._lock:
            self.snapshots.discard(snapshot_id)

    # -- node ----------------------------------------------------------------------------
    def stage(self, volume_id: str, name: str) -> str:
        """Stage at a directory we create, as the CO does."""
        path = os.path.join(self.staging_root, name)
        os.makedirs(path, exist_ok=True)
        self.csi.stage(pb.NodeStageVolumeRequest(
            volume_id=volume_id, staging_target_path=path, volume_capability=mount_cap(),
            secrets=self.secrets))
        with self._lock:
            self.staged[path] = volume_id
        return path

    def unstage(self, volume_id: str, path: str) -> None:
        self.csi.unstage(pb.NodeUnstageVolumeRequest(volume_id=volume_id,
                                                     staging_target_path=path))
        with self._lock:
            self.staged.pop(path, None)
        self._remove_dir(path, "NodeUnstageVolume left the staging path mounted")

    def publish(self, volume_id: str, staging: str, name: str) -> str:
        """Publish under a per-pod parent we create; the target itself is the driver's to make."""
        parent = os.path.join(self.pods_root, name)
        os.makedirs(parent, exist_ok=True)
        target = os.path.join(parent, "volume")
        self.csi.publish(pb.NodePublishVolumeRequest(
            volume_id=volume_id, staging_target_path=staging, target_path=target,
            volume_capability=mount_cap(), readonly=False))
        with self._lock:
            self.published[target] = volume_id
        return target

    def unpublish(self, volume_id: str, target: str) -> None:
        self.csi.unpublish(pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target))
        with self._lock:
            self.published.pop(target, None)
        if os.path.lexists(target):
            self.note_anomaly("NodeUnpublishVolume left the target path behind")
            self._remove_dir(target, "NodeUnpublishVolume left the target mounted")
        self._remove_dir(os.path.dirname(target), "could not remove a pod directory")

    def note_anomaly(self, anomaly: str) -> None:
        with self._lock:
            self.anomalies[anomaly] += 1

    def _remove_dir(self, path: str, anomaly: str) -> None:
        """rmdir a directory we made; never a recursive delete, which could reach into a mount."""
        try:
            os.rmdir(path)
        except OSError as exc:
            self.note_anomaly(f"{anomaly} ({exc.strerror})")

    # -- the safety net ------------------------------------------------------------------
    def sweep(self) -> Measurement:
        """Undo everything still in the ledger, newest layer first; failures become a row."""
        row = Measurement("cleanup", 1)
        with self._lock:
            published = dict(self.published)
            staged = dict(self.staged)
            snapshots = set(self.snapshots)
            volumes = set(self.volumes)
        steps = (
            [(self.unpublish, (vid, path)) for path, vid in published.items()]
            + [(self.unstage, (vid, path)) for path, vid in staged.items()]
        )
        for step, (vid, path) in steps:
            try:
                step(vid, path)
            except RpcFailure as exc:
                row.fail(exc)
        for snapshot_id in snapshots:
            try:
                self.delete_snapshot(snapshot_id)
            except RpcFailure as exc:
                row.fail(exc)
        for volume_id in volumes:
            try:
                self.delete(volume_id)
            except RpcFailure as exc:
                row.fail(exc)
        return row
