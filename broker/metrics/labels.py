"""The metrics' bounded label values and latency buckets, and the mapping into them.

Every label here takes a value from a fixed tuple (no per-client or per-session value),
so a series count is known before the broker runs; what falls outside maps to "error"
or "other".
"""

from __future__ import annotations

from broker.core import PasidError

# 50 µs .. 1 s: a session-stream alloc takes ~0.2 ms, a group commit ~0.1-1 ms; the
# client library's default buckets start at 5 ms and would put everything in the first.
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)

# How many clients `pasid_broker_top_client_pasids` names; the rest are summed as OTHER.
TOP_CLIENTS = 10
OTHER = "(other)"

# Bounded label values. Results are the core errors' reasons, lower-cased.
RESULTS = (
    "ok",
    "invalid_range",
    "invalid_argument",
    "exhausted",
    "quota_exceeded",
    "not_found",
    "conflict",
    "unsupported",
    "backend",
    "store",
    "error",
)
QUOTA_KINDS = ("set", "client", "global", "kernel")
RECLAIM_REASONS = ("client_exit", "grace_expired", "restart", "revoke", "other")
BACKEND_OPS = ("alloc", "free", "replay")
SESSION_OPS = ("open", "alloc", "free", "list", "request", "release")
UNARY_RPCS = (
    "Alloc",
    "Free",
    "List",
    "GetInfo",
    "PasidRequest",
    "ListSets",
    "RevokeSet",
    "SetQuotas",
    "ListWithheld",
)


def result_of(exc: BaseException | None) -> str:
    """The `result` label for an outcome: "ok", or the error's reason (bounded)."""
    if exc is None:
        return "ok"
    if isinstance(exc, PasidError):
        r = exc.reason.lower()
        return r if r in RESULTS else "error"
    return "error"


def reclaim_reason(reason: str) -> str:
    """Normalise the engine's free-text reasons for destroying a set into RECLAIM_REASONS."""
    r = reason.lower()
    if "revoke" in r:
        return "revoke"
    if "restart" in r:
        # A set nobody resumed after a broker restart; a client seen dead at restart
        # exited, which is its own reason.
        return "client_exit" if "exited" in r else "restart"
    if "grace" in r:
        return "grace_expired"
    if "disconnect" in r or "exit" in r or "release" in r:
        return "client_exit"
    return "other"
