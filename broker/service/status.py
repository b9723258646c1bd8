"""Where a core error becomes a gRPC status: this table, and nowhere else.

| core error      | kernel errno (seed)  | gRPC status          |
|-----------------|----------------------|----------------------|
| InvalidRange    | EINVAL               | INVALID_ARGUMENT     |
| InvalidArgument | EINVAL               | INVALID_ARGUMENT     |
| Exhausted       | ENOSPC               | RESOURCE_EXHAUSTED   |
| QuotaExceeded   | EDQUOT               | RESOURCE_EXHAUSTED   |
| LimitExceeded   | EAGAIN               | RESOURCE_EXHAUSTED   |
| NotFound        | ENOENT               | NOT_FOUND            |
| Revoked         | ENOENT               | NOT_FOUND (REVOKED)  |
| Conflict        | EBUSY                | FAILED_PRECONDITION  |
| Unsupported     | EOPNOTSUPP / ENOTTY  | FAILED_PRECONDITION  |
| BackendError    | other errno          | UNAVAILABLE          |
| StoreError      | EIO                  | UNAVAILABLE          |
| NotReady        | EAGAIN               | UNAVAILABLE          |
| Compacted       | ERANGE               | OUT_OF_RANGE         |
| PermissionDenied| EPERM                | PERMISSION_DENIED    |
| Unauthenticated | EACCES               | UNAUTHENTICATED      |
"""

from __future__ import annotations

import grpc
from pasid.v1 import broker_pb2 as pb

from broker.core.errors import (
    BackendError,
    Compacted,
    Conflict,
    Exhausted,
    InvalidArgument,
    NotFound,
    NotReady,
    PasidError,
    PermissionDenied,
    QuotaExceeded,
    StoreError,
    Unauthenticated,
    Unsupported,
)

ADMIN_ONLY = (
    "listing every set is an admin call: uid 0, the broker's uid or a member of"
    " --admin-group (with a peer ticket), or an --admin-subject certificate"
)
WATCH_OWN_SETS = (
    "Watch on the clients' socket shows only the caller's own set: name its session"
    " (session_id and token); the full event stream is an admin call"
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
    NotReady: grpc.StatusCode.UNAVAILABLE,
    Compacted: grpc.StatusCode.OUT_OF_RANGE,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}


def status_of(exc: PasidError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        code = STATUS.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def error_message(exc: PasidError) -> pb.Error:
    """The stream form of an error (the stream stays open)."""
    err = pb.Error(
        code=status_of(exc).value[0], message=exc.message, reason=exc.reason, errno=exc.errno
    )
    if isinstance(exc, QuotaExceeded):
        err.quota = exc.kind
        err.limit = exc.limit
    return err


def trailing_metadata(exc: PasidError) -> tuple[tuple[str, str], ...]:
    """The unary form's machine-readable part, mirrored by the client library."""
    md: tuple[tuple[str, str], ...] = (
        ("pasid-reason", exc.reason),
        ("pasid-errno", str(exc.errno)),
    )
    if isinstance(exc, QuotaExceeded):
        md += (("pasid-quota", exc.kind), ("pasid-limit", str(exc.limit)))
    if isinstance(exc, Compacted):
        md += (("pasid-oldest-revision", str(exc.oldest)),)
    return md
