"""Typed errors, mirroring the broker's: one class per way a request fails.

Each carries the gRPC status code, the broker's message, and for quota errors which quota
and its limit. The mapping from (code, reason) is the inverse of the broker's status table.
"""

from __future__ import annotations

import grpc

from pasid_client import access


class PasidClientError(Exception):
    """Any failure the broker reported (or the transport, as Unavailable)."""

    def __init__(
        self, code: grpc.StatusCode, message: str, reason: str = "", errno: int = 0
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        # The errno VFIO_IOMMU_PASID_REQUEST would have returned (0 when not known).
        self.errno = errno


class InvalidArgument(PasidClientError):
    """INVALID_ARGUMENT: a malformed request (the kernel's EINVAL)."""


class InvalidRange(InvalidArgument):
    """INVALID_ARGUMENT: min > max, or a bound at or beyond 2^pasid_bits."""


class ResourceExhausted(PasidClientError):
    """RESOURCE_EXHAUSTED: no free PASID in the range (ENOSPC)."""


class QuotaExceeded(ResourceExhausted):
    """RESOURCE_EXHAUSTED: a quota; `quota` is "set", "client" or "global". With reason
    LIMIT_EXCEEDED, one of the broker's limits (docs/limits.md): `quota` names it, e.g.
    "max_sessions_per_identity", and `limit` is its value."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str,
        quota: str,
        limit: int,
        errno: int = 0,
    ) -> None:
        super().__init__(code, message, reason, errno)
        self.quota = quota
        self.limit = limit


class NotFound(PasidClientError):
    """NOT_FOUND: unknown session, wrong token, or an expired resume token."""


class Revoked(NotFound):
    """NOT_FOUND with reason REVOKED: the set was revoked by an admin (the message says
    why). A session's reconnect that meets it ends as Aborted, as if the stream's own
    ABORTED had arrived (grpc can lose that one to a write racing the stream's end)."""


class FailedPrecondition(PasidClientError):
    """FAILED_PRECONDITION: unsupported by the backend, or a conflicting state."""


class OutOfRange(PasidClientError):
    """OUT_OF_RANGE: a Watch from a compacted revision; `oldest_revision` is available."""

    oldest_revision: int = 0


class PermissionDenied(PasidClientError):
    """PERMISSION_DENIED (or UNIMPLEMENTED admin calls): use the admin socket. With reason
    SOCKET_ACCESS, this process may not connect to the broker's Unix socket at all (not
    in its group): never retried, the message names the socket and the cause."""


class Unauthenticated(PasidClientError):
    """UNAUTHENTICATED: a ticket unknown, replayed or expired (reason TICKET; handshake
    again), or an anonymous open on a broker run with --anonymous refuse (ANONYMOUS)."""


class Aborted(PasidClientError):
    """ABORTED: the broker took the session's set (revoked, or its process exited)."""


class Unavailable(PasidClientError):
    """UNAVAILABLE: the broker, its store or its backend cannot serve now; retry later."""


class OutcomeUnknown(Unavailable):
    """A request was on its way when the session's stream broke (the broker went away),
    and no answer came: it may or may not have been applied (an alloc may have committed
    just before a crash). The library never sends it again by itself; the session resumes
    on its own, and its listing (`session.list()`) tells what the set holds."""


class SessionLost(Unavailable):
    """The session is gone for good: its stream broke and it could not be resumed before
    `reconnect_deadline_seconds` ran out, or the broker no longer knows its set. `cause`
    is the last failure (e.g. NotFound: the set was reclaimed meanwhile)."""

    def __init__(self, message: str, cause: PasidClientError | None = None) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, message, "SESSION_LOST")
        self.cause = cause


_BY_REASON: dict[str, type[PasidClientError]] = {
    "INVALID_RANGE": InvalidRange,
    "INVALID_ARGUMENT": InvalidArgument,
    "EXHAUSTED": ResourceExhausted,
    "REVOKED": Revoked,
}
_BY_CODE: dict[grpc.StatusCode, type[PasidClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def make_error(
    code: grpc.StatusCode,
    message: str,
    reason: str = "",
    quota: str = "",
    limit: int = 0,
    errno: int = 0,
) -> PasidClientError:
    if reason in ("QUOTA_EXCEEDED", "LIMIT_EXCEEDED"):
        return QuotaExceeded(code, message, reason, quota, limit, errno)
    cls = _BY_REASON.get(reason) or _BY_CODE.get(code, PasidClientError)
    return cls(code, message, reason, errno)


def socket_refused(path: str) -> PermissionDenied:
    """connect(2) to the Unix socket `path` was refused by permission: why, in one line."""
    return PermissionDenied(
        grpc.StatusCode.PERMISSION_DENIED, access.why_refused(path), "SOCKET_ACCESS"
    )


def from_rpc_error(exc: grpc.RpcError) -> PasidClientError:
    """Translate a failed unary call or stream (grpc.RpcError) into a typed error. gRPC
    reports a Unix socket that refuses us by permission as UNAVAILABLE, as it does a broker
    not there yet: that one becomes PermissionDenied (SOCKET_ACCESS)."""
    code: grpc.StatusCode = exc.code()
    details: str = exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and (path := access.grpc_refused_path(details)):
        return socket_refused(path)
    md = dict(exc.trailing_metadata() or ())
    err = make_error(
        code,
        details,
        str(md.get("pasid-reason", "")),
        str(md.get("pasid-quota", "")),
        int(md.get("pasid-limit", 0) or 0),
        int(md.get("pasid-errno", 0) or 0),
    )
    if isinstance(err, OutOfRange):
        err.oldest_revision = int(md.get("pasid-oldest-revision", 0) or 0)
    return err


def from_status_code_int(code: int) -> grpc.StatusCode:
    for c in grpc.StatusCode:
        if c.value[0] == code:
            return c
    return grpc.StatusCode.UNKNOWN


def from_admin_rpc_error(exc: grpc.RpcError) -> PasidClientError:
    """As from_rpc_error; UNIMPLEMENTED means the admin service is not on this socket."""
    if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
        return PermissionDenied(
            grpc.StatusCode.UNIMPLEMENTED, "admin calls are served only on the admin socket"
        )
    return from_rpc_error(exc)
