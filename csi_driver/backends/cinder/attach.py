"""ControllerPublish/Unpublish for Cinder volumes, in one of two ways:

  nova    the node is a Nova server: Nova attaches the volume (its volume-attachment API) and
          the disk appears in the server; the node finds it under /dev/disk/by-id
  cinder  any other node: a Cinder attachment with the node's connector; the connection info it
          returns goes to the node in publish_context and the node connects it itself

Each attachment is recorded in the volume's metadata (records.ATTACH + node) *before* it is made,
marked pending: a controller killed mid-publish leaves the mark, and the retry (or an unpublish)
knows to look for what the killed attempt made, so one attachment per node results, never an orphan.
The services hold the volume's lock around each call.
"""

from __future__ import annotations

import re
import threading
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ... import errors, faults
from ..base import Attachment
from . import records
from .cloud import Api

if TYPE_CHECKING:
    from .backend import CinderBackend

ATTACHMENTS_MV = "3.54"  # attachment create with connector and mode in one call
NOVA_MV = "2.60"  # multi-attach volumes

# publish_context keys (what the node needs of the connection info; never a secret)
CTX_TYPE, CTX_NAME, CTX_MONITORS, CTX_USER, CTX_ATTACHMENT, CTX_SERVER = (
    "cinder/type", "cinder/name", "cinder/monitors", "cinder/user", "cinder/attachment",
    "cinder/server")


class Attacher:
    def __init__(self, backend: CinderBackend) -> None:
        self.backend = backend
        self.config = backend.config
        self._servers: dict[str, str] = {}  # node ID -> server ID, as Nova last said
        self._lock = threading.Lock()

    # -- shared --------------------------------------------------------------------------
    def _volume(self, api: Api, local_id: str) -> dict[str, Any]:
        data = self.backend.get(api, local_id)
        if data is None:
            raise errors.NotFound(f"volume {self.backend.name}:{local_id} does not exist")
        return data

    @staticmethod
    def _record(api: Api, local_id: str, node_id: str, record: Mapping[str, Any]) -> None:
        api.volume("POST", f"/volumes/{_q(local_id)}/metadata", f"recording the attachment to "
                   f"node {node_id}", body={"metadata": {records.ATTACH + node_id:
                                                         records.value(dict(record))}})

    @staticmethod
    def _unrecord(api: Api, local_id: str, node_id: str) -> None:
        api.volume("DELETE", f"/volumes/{_q(local_id)}/metadata/{_q(records.ATTACH + node_id)}",
                   f"forgetting the attachment to node {node_id}", missing_ok=True)

    def attach(self, api: Api, local_id: str, attachment: Attachment) -> Mapping[str, str]:
        data = self.backend.recent(api, local_id)
        if data is None:
            raise errors.NotFound(f"volume {self.backend.name}:{local_id} does not exist")
        current = records.attachments(data.get("metadata") or {}).get(attachment.node_id)
        if self.config.attach == "nova":
            return self._nova_attach(api, data, attachment, current)
        return self._cinder_attach(api, data, attachment, current)

    def detach(self, api: Api, local_id: str, node_id: str) -> None:
        data = self.backend.get(api, local_id)
        if data is None:
            return
        held = records.attachments(data.get("metadata") or {})
        for node, record in sorted(held.items()):
            if node_id and node != node_id:
                continue
            if self.config.attach == "nova":
                self._nova_detach(api, data, node, record)
            else:
                self._cinder_detach(api, data, node, record, held)
            self._unrecord(api, local_id, node)

    def node_known(self, api: Api, node_id: str) -> bool:
        if self.config.attach == "nova":
            return self._server(api, node_id) is not None
        return not self.config.nodes or node_id in self.config.nodes

    # -- cinder attachments --------------------------------------------------------------
    def _connector(self, node_id: str) -> dict[str, Any]:
        facts = self.config.nodes.get(node_id, {})
        return {"host": facts.get("host", node_id), "ip": facts.get("ip", ""),
                "initiator": facts.get("initiator", ""), "platform": "x86_64",
                "os_type": "linux", "multipath": False, "do_local_attach": False}

    def _orphans(self, api: Api, data: Mapping[str, Any],
                 held: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """Attachments of the volume that no record names: what a killed publish made."""
        named = {r.get("a") for r in held.values()}
        query = urllib.parse.urlencode({"volume_id": data["id"]})
        rows = api.volume("GET", f"/attachments?{query}", "listing the volume's attachments",
                          microversion=ATTACHMENTS_MV)["attachments"]
        return [str(a["id"]) for a in rows if a["id"] not in named and not a.get("instance")]

    def _cinder_attach(self, api: Api, data: dict[str, Any], attachment: Attachment,
                       current: Mapping[str, Any] | None) -> Mapping[str, str]:
        local_id, node = str(data["id"]), attachment.node_id
        if current and current.get("a"):
            found = api.volume("GET", f"/attachments/{_q(current['a'])}",
                               f"reading attachment {current['a']}", microversion=ATTACHMENTS_MV,
                               missing_ok=True)
            if found is not None and found["attachment"].get("connection_info"):
                att = found["attachment"]
                if att.get("status") != "attached":
                    self._complete(api, str(att["id"]))
                return _context(att["connection_info"], str(att["id"]))
        if current and current.get("p"):
            held = records.attachments(data.get("metadata") or {})
            for orphan in self._orphans(api, data, held):
                api.volume("DELETE", f"/attachments/{_q(orphan)}",
                           f"removing attachment {orphan} an interrupted publish left",
                           microversion=ATTACHMENTS_MV, missing_ok=True)
        self._record(api, local_id, node, records.attachment_record(attachment, p=1))
        mode = "ro" if attachment.readonly or attachment.capability.read_only else "rw"
        try:
            att = api.volume("POST", "/attachments", f"attaching volume {local_id} to node {node}",
                             body={"attachment": {"volume_uuid": local_id,
                                                  "connector": self._connector(node),
                                                  "mode": mode}},
                             microversion=ATTACHMENTS_MV)["attachment"]
        except errors.InvalidArgument as exc:  # the volume's state refused it, not the request
            self._unrecord(api, local_id, node)
            raise errors.FailedPrecondition(exc.message) from None
        faults.point("publish")
        self._complete(api, str(att["id"]))
        self._record(api, local_id, node, records.attachment_record(attachment, a=att["id"]))
        return _context(att.get("connection_info") or {}, str(att["id"]))

    @staticmethod
    def _complete(api: Api, attachment_id: str) -> None:
        api.volume("POST", f"/attachments/{_q(attachment_id)}/action",
                   f"completing attachment {attachment_id}",
                   body={"os-complete": attachment_id}, microversion="3.44")

    def _cinder_detach(self, api: Api, data: Mapping[str, Any], node: str,
                       record: Mapping[str, Any], held: Mapping[str, Mapping[str, Any]]) -> None:
        ids = [str(record["a"])] if record.get("a") else []
        if record.get("p"):
            ids += self._orphans(api, data, held)
        for attachment_id in ids:
            api.volume("DELETE", f"/attachments/{_q(attachment_id)}",
                       f"detaching volume {data['id']} from node {node}",
                       microversion=ATTACHMENTS_MV, missing_ok=True)

    # -- nova ----------------------------------------------------------------------------
    def _server(self, api: Api, node_id: str) -> str | None:
        """The Nova server of a node: a server ID, or the server named like the node (as
        Kubernetes names OpenStack nodes after their servers)."""
        with self._lock:
            cached = self._servers.get(node_id)
        if cached:
            if api.compute("GET", f"/servers/{cached}", f"reading server {cached}",
                           missing_ok=True) is not None:
                return cached
            with self._lock:
                self._servers.pop(node_id, None)
        found: str | None = None
        if records.is_uuid(node_id.lower()) and api.compute(
                "GET", f"/servers/{node_id.lower()}", f"reading server {node_id}",
                missing_ok=True) is not None:
            found = node_id.lower()
        if found is None:
            query = urllib.parse.urlencode({"name": f"^{re.escape(node_id)}$"})
            rows = api.compute("GET", f"/servers?{query}", f"looking up server {node_id}")
            named = [s["id"] for s in rows["servers"] if s.get("name") == node_id]
            if len(named) > 1:
                raise errors.FailedPrecondition(
                    f"{len(named)} Nova servers are named {node_id!r}; use the server ID as the "
                    "node ID")
            found = named[0] if named else None
        if found:
            with self._lock:
                self._servers[node_id] = found
        return found

    @staticmethod
    def _attached_to(data: Mapping[str, Any], server: str) -> bool:
        return any(a.get("server_id") == server for a in data.get("attachments") or ())

    def _nova_attach(self, api: Api, data: dict[str, Any], attachment: Attachment,
                     current: Mapping[str, Any] | None) -> Mapping[str, str]:
        local_id, node = str(data["id"]), attachment.node_id
        server = self._server(api, node)
        if server is None:
            raise errors.NotFound(f"node {node!r} is no Nova server")
        if current is None or current.get("s") != server:
            self._record(api, local_id, node, records.attachment_record(attachment, p=1, s=server))
        if not self._attached_to(data, server):
            if data["status"] not in ("attaching", "reserved"):
                try:
                    api.compute("POST", f"/servers/{server}/os-volume_attachments",
                                f"attaching volume {local_id} to server {server}",
                                body={"volumeAttachment": {"volumeId": local_id}},
                                microversion=NOVA_MV)
                except errors.InvalidArgument as exc:
                    self._unrecord(api, local_id, node)
                    raise errors.FailedPrecondition(exc.message) from None
            faults.point("publish")
            data = self.backend.backoff.wait(
                "nova-attach", self.backend.deadline(),
                lambda: self._volume(api, local_id),
                lambda v: self._attached_to(v, server) or v["status"] in ("available", "error"),
                f"attaching volume {local_id} to server {server}")
            if not self._attached_to(data, server):
                self._unrecord(api, local_id, node)
                raise errors.Unavailable(f"Nova did not attach volume {local_id} to server "
                                         f"{server} ({data['status']}); see the server's actions")
        self._record(api, local_id, node, records.attachment_record(attachment, s=server))
        return {CTX_SERVER: server}

    def _nova_detach(self, api: Api, data: Mapping[str, Any], node: str,
                     record: Mapping[str, Any]) -> None:
        local_id, server = str(data["id"]), str(record.get("s", ""))
        if not server or not self._attached_to(data, server):
            return
        gone = api.compute("DELETE", f"/servers/{server}/os-volume_attachments/{_q(local_id)}",
                           f"detaching volume {local_id} from server {server}",
                           microversion=NOVA_MV, missing_ok=True)
        if gone is None:  # the server is gone: Nova dropped its attachments with it
            return
        self.backend.backoff.wait(
            "nova-detach", self.backend.deadline(), lambda: self._volume(api, local_id),
            lambda v: not self._attached_to(v, server),
            f"detaching volume {local_id} from server {server}")


def _context(info: Mapping[str, Any], attachment_id: str) -> dict[str, str]:
    """What the node needs of Cinder's connection info, as publish_context."""
    kind = str(info.get("driver_volume_type", ""))
    data: Mapping[str, Any] = info.get("data") or info
    ctx = {CTX_TYPE: kind, CTX_ATTACHMENT: attachment_id}
    if kind == "rbd":
        hosts, ports = data.get("hosts") or [], data.get("ports") or []
        ctx[CTX_NAME] = str(data.get("name", ""))
        ctx[CTX_MONITORS] = ",".join(f"[{h}]:{p}" if ":" in str(h) else f"{h}:{p}"
                                     for h, p in zip(hosts, ports, strict=False))
        ctx[CTX_USER] = str(data.get("auth_username", ""))
    return ctx


def _q(text: str) -> str:
    return urllib.parse.quote(str(text), safe="")
