"""hostPath on-disk layout. An object exists exactly when its directory is in place:

  volumes/<id>/    the volume's files (directory layout) or disk.img (image and block layouts)
  snapshots/<id>/  the same payload as the volume it was taken from
  groups/<id>/     an empty directory
  .tmp/            objects being assembled; renamed into place when complete
  .trash/          objects being removed; renamed out of place first

Each object directory carries its record as JSON in the extended attribute `trusted.berth`
(root-only, so a pod cannot read or change it through its volume's root). One mkdir and one
setxattr per object is about half the filesystem work of a data sub-directory plus a meta file,
which is most of what CreateVolume costs.

A crash therefore leaves either nothing or leftovers in .tmp/.trash, which `prepare` removes, and
member snapshots of a group whose own directory never appeared, which `prepare` removes too.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ... import faults

DIRECTORY, IMAGE, BLOCK = "directory", "image", "block"
IMAGE_FILE = "disk.img"
# trusted.* needs CAP_SYS_ADMIN, so pods cannot see it; without root (development) fall back.
XATTR = "trusted.berth" if os.geteuid() == 0 else "user.berth"
LAYOUTS = (DIRECTORY, IMAGE, BLOCK)


@dataclass
class Record:
    """The record of a volume or a snapshot."""

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
        """The data directory (the object's own) or the image file of a volume or snapshot."""
        if rec.layout == DIRECTORY:
            return self.path(kind_dir, local_id)
        return self.path(kind_dir, local_id, IMAGE_FILE)

    @staticmethod
    def ids(kind_dir: str) -> list[str]:
        return sorted(os.listdir(kind_dir))

    # -- records -------------------------------------------------------------------------
    @staticmethod
    def _load(path: str) -> Any:
        try:
            return json.loads(os.getxattr(path, XATTR))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ENODATA:  # a directory that is not (yet) one of ours
                return None
            raise

    def read(self, kind_dir: str, local_id: str) -> Record | None:
        data = self._load(self.path(kind_dir, local_id))
        return None if data is None else Record(**data)

    def read_group(self, local_id: str) -> GroupRecord | None:
        data = self._load(self.path(self.groups, local_id))
        return None if data is None else GroupRecord(**data)

    @staticmethod
    def write_meta(directory: str, record: Record | GroupRecord) -> None:
        """(Re)write an object's record; setxattr replaces the value atomically."""
        os.setxattr(directory, XATTR, json.dumps(vars(record)).encode())

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
