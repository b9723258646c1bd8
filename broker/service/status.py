"""Where a core error becomes a gRPC status: this table, and nowhere else.

| core error      | kernel errno (seed)  | gRPC status          |
|-----------------|----------------------|----------------------|
| InvalidRange    | EINVAL               | INVALID_ARGUMENT     |
| InvalidArgument | EINVAL               | INVALID_ARGUMENT     |
| Exhausted       | ENOSPC               | RESOURCE_EXHAUSTED   |
| QuotaExceeded   | EDQUOT               | RESOURCE_EXHAUSTED   |
| NotFound        | ENOENT               | NOT_FOUND            |
| Conflict        | EBUSY                | FAILED_PRECONDITION  |
| Unsupported     | EOPNOTSUPP / ENOTTY  | FAILED_PRECONDITION  |
| BackendError    | other errno          | UNAVAILABLE          |
| StoreError      | EIO                  | UNAVAILABLE          |
"""

from __future__ import annotations

import grpc
from pasid.v1 import broker_pb2 as pb

from broker.core.errors import (
    BackendError,
    Conflict,
    Exhausted,
    InvalidArgument,
    NotFound,
    PasidError,
    QuotaExceeded,
    StoreError,
    Unsupported,
)

STATUS: dict[type[PasidError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,  # InvalidRange is a subclass
    Exhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    QuotaExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Conflict: grpc.StatusCode.FAILED_PRECONDITION,
    Unsupported: grpc.StatusCode.FAILED_PRECONDITION,
    BackendError: grpc.StatusCode.UNAVAILABLE,
    StoreError: grpc.StatusCode.UNAVAILABLE,
}


def status_of(exc: PasidError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        code = STATUS.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def error_message(exc: PasidError) -> pb.Error:
    """The stream form of an error (the stream stays open)."""
    err = pb.Error(code=status_of(exc).value[0], message=exc.message, reason=exc.reason)
    if isinstance(exc, QuotaExceeded):
        err.quota = exc.kind
        err.limit = exc.limit
    return err


def trailing_metadata(exc: PasidError) -> tuple[tuple[str, str], ...]:
    """The unary form's machine-readable part, mirrored by the client library."""
    md: tuple[tuple[str, str], ...] = (("pasid-reason", exc.reason),)
    if isinstance(exc, QuotaExceeded):
        md += (("pasid-quota", exc.kind), ("pasid-limit", str(exc.limit)))
    return md
