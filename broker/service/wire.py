"""What arrives off the wire: tolerant decoding, range checks, malformed-request accounting.

Every integer and string a client sends is checked here before the engine sees it, so
that nothing a client sends reaches a traceback, the kernel's int-sized arguments, or the
database (SQLite integers are signed 64-bit). A request that fails a check is malformed:
INVALID_ARGUMENT, counted (pasid_broker_malformed_requests_total{method}) and logged at
most once per peer per interval, without a traceback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from broker.core import InvalidArgument, LimitExceeded
from broker.logs import LogThrottle
from broker.service.interceptors import PerMethodWrapper, rebuild
from broker.service.limits import Limits

log = logging.getLogger("pasid_broker.service")

# The kernel's PID_MAX_LIMIT (include/linux/threads.h: 4 * 1024 * 1024 on 64-bit): no pid
# is larger, and pidfd_open/kill take a signed int.
PID_MAX_LIMIT = 4 * 1024 * 1024
# SQLite stores revisions and set ids as signed 64-bit integers.
INT64_MAX = 2**63 - 1
# Resume tokens the broker issues are 32 characters; anything much longer is not one.
MAX_TOKEN_CHARS = 256
# RevokeSet's reason is stored with the event and shown in listings.
MAX_REASON_BYTES = 1024


class Malformed:
    """What a request that does not parse as its message type decodes to: the handler
    (the servicer's boundary) refuses it, instead of grpc logging a traceback."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # DecodeError, and whatever else bad bytes provoke
            return Malformed(f"request does not parse: {type(exc).__name__}")

    return decode


class TolerantDecoding(PerMethodWrapper):
    """A server interceptor giving every pasid.v1 method a decoder that never raises."""

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler is None or not method.startswith("/pasid.v1."):
            return handler
        de = handler.request_deserializer
        return rebuild(handler, request_deserializer=tolerant(de)) if de else handler


class MalformedRequests:
    """Counts every malformed request; logs one line per peer per `interval` seconds
    (and a few per interval over all peers), with how many were not logged since."""

    def __init__(
        self,
        count: Callable[[str], None] | None = None,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._count = count or (lambda method: None)
        self._throttle = LogThrottle(1, interval, clock=clock)

    def report(self, method: str, peer: str, error: str) -> None:
        self._count(method)
        suppressed = self._throttle.allow(peer)
        if suppressed is None:
            return
        log.warning(
            "malformed request",
            extra={"method": method, "peer": peer, "error": error, "suppressed": suppressed},
        )


# -- range checks (each raises InvalidArgument naming the bound, or LimitExceeded) --------


def check_pid(pid: int) -> int:
    """A declared pid (a claim checked against the verified holder): 0 or a real pid."""
    if not 0 <= pid <= PID_MAX_LIMIT:
        raise InvalidArgument(
            f"pid {pid} outside 0..{PID_MAX_LIMIT} (the kernel's PID_MAX_LIMIT; 0 = none)"
        )
    return pid


def check_revision(revision: int) -> int:
    if not 0 <= revision <= INT64_MAX:
        raise InvalidArgument(
            f"from_revision {revision} > {INT64_MAX}, the largest revision the event log holds"
        )
    return revision


def check_client_name(client: str, limits: Limits) -> str:
    n = len(client.encode())
    if n > limits.max_client_name_bytes:
        raise InvalidArgument(
            f"client name is {n} bytes; the limit is {limits.max_client_name_bytes}"
            " (--max-client-name-bytes)"
        )
    if not client.isprintable():
        raise InvalidArgument("client name has control characters; use printable text")
    return client


def check_token(token: str, what: str = "token") -> str:
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidArgument(
            f"{what} is {len(token)} characters; no token is over {MAX_TOKEN_CHARS}"
        )
    return token


def check_reason(reason: str) -> str:
    n = len(reason.encode())
    if n > MAX_REASON_BYTES:
        raise InvalidArgument(f"reason is {n} bytes; the limit is {MAX_REASON_BYTES}")
    if not reason.isprintable():
        raise InvalidArgument("reason has control characters; use printable text")
    return reason


# A witness states at most the whole 20-bit PCIe space, in at most this many ranges.
MAX_WITNESS_PASIDS = 1 << 20
MAX_WITNESS_RANGES = 1 << 16


def pasids_of(ranges: Any) -> list[int]:
    """OpenSession.held (PasidRange min..max each) as PASIDs, checked: min <= max, at most
    MAX_WITNESS_RANGES ranges and MAX_WITNESS_PASIDS PASIDs (else InvalidArgument)."""
    if len(ranges) > MAX_WITNESS_RANGES:
        raise InvalidArgument(
            f"held has {len(ranges)} ranges; a witness states at most {MAX_WITNESS_RANGES}"
        )
    out: set[int] = set()
    for r in ranges:
        if r.min > r.max:
            raise InvalidArgument(f"held range [{r.min}, {r.max}]: min > max")
        if len(out) + r.max - r.min + 1 > MAX_WITNESS_PASIDS:
            raise InvalidArgument(f"held states over {MAX_WITNESS_PASIDS} PASIDs")
        out.update(range(r.min, r.max + 1))
    return sorted(out)


def check_count(count: int, limits: Limits) -> int:
    """An Alloc's count (0 means 1), at most --max-pasids-per-request."""
    n = count or 1
    cap = limits.max_pasids_per_request
    if cap and n > cap:
        raise LimitExceeded(
            "max_pasids_per_request",
            cap,
            f"count {n} exceeds --max-pasids-per-request {cap}; ask in several requests",
        )
    return n
