"""Around every RPC: a request id, one log line, and typed errors (and requests that do not
decode) turned into gRPC statuses.

Only the method, request id, status, duration and our own error message are logged at INFO; at
DEBUG the request is logged too, with every field the CSI spec marks as secret blanked out.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError, Message

from . import requestid
from .csi import csi_pb2 as pb
from .errors import CsiError, InvalidArgument

log = logging.getLogger("csi_driver.rpc")
_ids = itertools.count(1)
_prefix = os.urandom(3).hex()


def redacted(message: Message) -> Message:
    """A copy of `message` whose csi_secret fields show only their keys."""
    copy = type(message)()
    copy.CopyFrom(message)
    for field, value in copy.ListFields():
        # The generated stub types the extension loosely; it is a bool FieldOptions extension.
        if field.GetOptions().Extensions[pb.csi_secret]:  # type: ignore[index]
            keys = list(value.keys()) if field.message_type else []
            copy.ClearField(field.name)
            for key in keys:
                getattr(copy, field.name)[key] = "***"
        elif field.message_type and not field.is_repeated:
            getattr(copy, field.name).CopyFrom(redacted(value))
    return copy


def _decode(deserialize: Callable[[bytes], Any] | None, raw: bytes) -> Any:
    """The request message, or InvalidArgument for bytes that are not one (bad UTF-8 in a
    string field, a truncated field...)."""
    if deserialize is None:
        return raw
    try:
        return deserialize(raw)
    except DecodeError as exc:
        raise InvalidArgument(f"malformed request: {exc}") from None


class RpcObserver(Protocol):
    """What counts RPCs (metrics.Metrics, when metrics are on)."""

    def rpc_started(self, method: str) -> None: ...

    def rpc_finished(self, method: str, code: grpc.StatusCode, seconds: float) -> None: ...


class _Outcome:
    """What an RPC ended with, filled in by RpcInterceptor._call."""

    code = grpc.StatusCode.OK
    detail = ""


class RpcInterceptor(grpc.ServerInterceptor):
    def __init__(self, slow_ms: float = 10_000.0, observer: RpcObserver | None = None) -> None:
        self.slow_ms = slow_ms  # an RPC this long also gets a WARNING line
        self.observer = observer

    @contextlib.contextmanager
    def _call(self, method: str, context: grpc.ServicerContext) -> Iterator[str]:
        """Around one RPC (a unary call, or a whole response stream): its request id, the
        log line and metrics at its end, and errors turned into its status."""
        rid = f"{_prefix}-{next(_ids)}"
        token = requestid.current.set(rid)
        start = time.perf_counter()
        out = _Outcome()
        if self.observer is not None:
            self.observer.rpc_started(method)
        try:
            yield rid
        except CsiError as exc:
            out.code, out.detail = exc.code, exc.message
        except NotImplementedError:
            out.code, out.detail = grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented"
        except GeneratorExit:  # the client went away mid-stream
            out.code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            log.exception("rpc=%s id=%s failed unexpectedly", method, rid)
            out.code = grpc.StatusCode.INTERNAL
            out.detail = f"internal error (request id {rid}); the driver log has the details"
        finally:
            ms = (time.perf_counter() - start) * 1000
            if self.observer is not None:
                self.observer.rpc_finished(method, out.code, ms / 1000)
            log.info("rpc=%s id=%s status=%s duration_ms=%.2f%s", method, rid, out.code.name,
                     ms, f" error={out.detail!r}" if out.detail else "")
            if ms >= self.slow_ms:
                log.warning("slow rpc=%s id=%s took %.0f ms (threshold %.0f ms)", method,
                            rid, ms, self.slow_ms)
            requestid.current.reset(token)
        if out.code != grpc.StatusCode.OK:
            context.abort(out.code, out.detail)

    @staticmethod
    def _request(deserialize: Callable[[bytes], Any] | None, raw: bytes, method: str,
                 rid: str) -> Any:
        request = _decode(deserialize, raw)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("rpc=%s id=%s request={%s}", method, rid,
                      str(redacted(request)).replace("\n", " ").strip())
        return request

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        if handler is None:
            return handler
        method = details.method
        deserialize = handler.request_deserializer
        # grpcio answers a request its deserializer rejects with INTERNAL "Exception
        # deserializing request!" before any handler runs; taking the bytes as they are and
        # decoding them here lets a malformed request be the client's error.
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            def wrapped(raw: bytes, context: grpc.ServicerContext) -> Any:
                with self._call(method, context) as rid:
                    return unary(self._request(deserialize, raw, method, rid), context)

            return grpc.unary_unary_rpc_method_handler(
                wrapped, request_deserializer=None,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:  # SnapshotMetadata's streams
            stream = handler.unary_stream

            def streamed(raw: bytes, context: grpc.ServicerContext) -> Iterator[Any]:
                with self._call(method, context) as rid:
                    yield from stream(self._request(deserialize, raw, method, rid), context)

            return grpc.unary_stream_rpc_method_handler(
                streamed, request_deserializer=None,
                response_serializer=handler.response_serializer)
        return handler
