"""hostPath on-disk layout. An object exists exactly when its directory is in place:

  volumes/<id>/    meta.json + data/ (directory layout) or disk.img (image and block layouts)
  snapshots/<id>/  meta.json + the same payload as the volume it was taken from
  groups/<id>/     meta.json naming the member snapshots
  .tmp/            objects being assembled; renamed into place when complete
  .trash/          objects being removed; renamed out of place first

A crash therefore leaves either nothing or leftovers in .tmp/.trash, which `prepare` removes, and
member snapshots of a group whose own directory never appeared, which `prepare` removes too.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from ... import faults

DIRECTORY, IMAGE, BLOCK = "directory", "image", "block"
LAYOUTS = (DIRECTORY, IMAGE, BLOCK)


@dataclass
class Record:
    """What meta.json holds for a volume or a snapshot."""

    name: str
    size: int
    layout: str
    fs_type: str = ""
    parameters: dict[str, str] = field(default_factory=dict)
    mutable: dict[str, str] = field(default_factory=dict)
    source_kind: str = ""  # volumes: "snapshot" | "volume" | ""
    source_id: str = ""  # volumes: the source's local ID; snapshots: the volume's
    group: str = ""  # snapshots: the group snapshot they belong to
    created: float = field(default_factory=time.time)


@dataclass
class GroupRecord:
    name: str
    members: list[str]
    sources: list[str]
    created: float = field(default_factory=time.time)


class Store:
    def __init__(self, root: str) -> None:
        self.root = root
        self.volumes = os.path.join(root, "volumes")
        self.snapshots = os.path.join(root, "snapshots")
        self.groups = os.path.join(root, "groups")
        self.tmp = os.path.join(root, ".tmp")
        self.trash = os.path.join(root, ".trash")

    def prepare(self) -> None:
        for d in (self.volumes, self.snapshots, self.groups, self.tmp, self.trash):
            os.makedirs(d, 0o711, exist_ok=True)
        for d in (self.tmp, self.trash):
            for leftover in os.listdir(d):
                shutil.rmtree(os.path.join(d, leftover), ignore_errors=True)
        for local_id in self.ids(self.snapshots):
            rec = self.read(self.snapshots, local_id)
            if rec is not None and rec.group and self.read_group(rec.group) is None:
                self.discard(self.snapshots, local_id)

    # -- paths ---------------------------------------------------------------------------
    @staticmethod
    def path(kind_dir: str, local_id: str, *parts: str) -> str:
        # local_id was validated by ids.parse or made by ids.local_id_for_name: one component.
        return os.path.join(kind_dir, local_id, *parts)

    def payload(self, kind_dir: str, local_id: str, rec: Record) -> str:
        """The data directory or the image file of a volume or snapshot."""
        return self.path(kind_dir, local_id, "data" if rec.layout == DIRECTORY else "disk.img")

    @staticmethod
    def ids(kind_dir: str) -> list[str]:
        return sorted(os.listdir(kind_dir))

    # -- records -------------------------------------------------------------------------
    def read(self, kind_dir: str, local_id: str) -> Record | None:
        try:
            with open(self.path(kind_dir, local_id, "meta.json"), "rb") as f:
                return Record(**json.load(f))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read_group(self, local_id: str) -> GroupRecord | None:
        try:
            with open(self.path(self.groups, local_id, "meta.json"), "rb") as f:
                return GroupRecord(**json.load(f))
        except (FileNotFoundError, NotADirectoryError):
            return None

    @staticmethod
    def write_meta(directory: str, record: Record | GroupRecord) -> None:
        """Atomically (re)write meta.json in `directory`."""
        tmp = os.path.join(directory, f".meta.{uuid.uuid4().hex[:8]}")
        with open(tmp, "w") as f:
            json.dump(asdict(record), f)
        os.rename(tmp, os.path.join(directory, "meta.json"))

    # -- assembling and removing -----------------------------------------------------------
    def scratch(self, local_id: str) -> str:
        path = os.path.join(self.tmp, f"{local_id}.{uuid.uuid4().hex[:8]}")
        os.mkdir(path, 0o711)
        return path

    def commit(self, scratch: str, kind_dir: str, local_id: str, record: Any,
               fault: str) -> None:
        self.write_meta(scratch, record)
        faults.point(fault)
        os.rename(scratch, self.path(kind_dir, local_id))

    def discard(self, kind_dir: str, local_id: str, fault: str = "") -> bool:
        """Remove an object: rename it out of place (atomic), then delete. False if absent."""
        doomed = os.path.join(self.trash, f"{local_id}.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path(kind_dir, local_id), doomed)
        except FileNotFoundError:
            return False
        if fault:
            faults.point(fault)
        shutil.rmtree(doomed, ignore_errors=True)
        return True
