"""Typed errors that carry their gRPC status code.

Handlers and backends raise these; the interceptor turns them into a status with the message
unchanged, so every message must be written for a human operator and must never contain secrets.
"""

from __future__ import annotations

import grpc


class CsiError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(CsiError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CsiError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CsiError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Aborted(CsiError):
    code = grpc.StatusCode.ABORTED


class FailedPrecondition(CsiError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRange(CsiError):
    code = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhausted(CsiError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(CsiError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(CsiError):
    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(CsiError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(CsiError):
    code = grpc.StatusCode.INTERNAL


class Unauthenticated(CsiError):
    code = grpc.StatusCode.UNAUTHENTICATED


class DeadlineExceeded(CsiError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
