"""Typed errors, mirroring the broker's: one class per way a request fails.

Each carries the gRPC status code, the broker's message, and for quota errors which quota
and its limit. The mapping from (code, reason) is the inverse of the broker's status table.
"""

from __future__ import annotations

import grpc


class PasidClientError(Exception):
    """Any failure the broker reported (or the transport, as Unavailable)."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "") -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason


class InvalidArgument(PasidClientError):
    """INVALID_ARGUMENT: a malformed request (the kernel's EINVAL)."""


class InvalidRange(InvalidArgument):
    """INVALID_ARGUMENT: min > max, or a bound at or beyond 2^pasid_bits."""


class ResourceExhausted(PasidClientError):
    """RESOURCE_EXHAUSTED: no free PASID in the range (ENOSPC)."""


class QuotaExceeded(ResourceExhausted):
    """RESOURCE_EXHAUSTED: a quota; `quota` is "set", "client" or "global"."""

    def __init__(
        self, code: grpc.StatusCode, message: str, reason: str, quota: str, limit: int
    ) -> None:
        super().__init__(code, message, reason)
        self.quota = quota
        self.limit = limit


class NotFound(PasidClientError):
    """NOT_FOUND: unknown session, wrong token, or an expired resume token."""


class FailedPrecondition(PasidClientError):
    """FAILED_PRECONDITION: unsupported by the backend, or a conflicting state."""


class Unavailable(PasidClientError):
    """UNAVAILABLE: the broker, its store or its backend cannot serve now; retry later."""


_BY_REASON: dict[str, type[PasidClientError]] = {
    "INVALID_RANGE": InvalidRange,
    "INVALID_ARGUMENT": InvalidArgument,
    "EXHAUSTED": ResourceExhausted,
}
_BY_CODE: dict[grpc.StatusCode, type[PasidClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def make_error(
    code: grpc.StatusCode, message: str, reason: str = "", quota: str = "", limit: int = 0
) -> PasidClientError:
    if reason == "QUOTA_EXCEEDED":
        return QuotaExceeded(code, message, reason, quota, limit)
    cls = _BY_REASON.get(reason) or _BY_CODE.get(code, PasidClientError)
    return cls(code, message, reason)


def from_rpc_error(exc: grpc.RpcError) -> PasidClientError:
    """Translate a failed unary call or stream (grpc.RpcError) into a typed error."""
    code: grpc.StatusCode = exc.code()
    details: str = exc.details() or ""
    md = dict(exc.trailing_metadata() or ())
    return make_error(
        code,
        details,
        str(md.get("pasid-reason", "")),
        str(md.get("pasid-quota", "")),
        int(md.get("pasid-limit", 0) or 0),
    )


def from_status_code_int(code: int) -> grpc.StatusCode:
    for c in grpc.StatusCode:
        if c.value[0] == code:
            return c
    return grpc.StatusCode.UNKNOWN
