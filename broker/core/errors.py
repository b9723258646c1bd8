"""The core's exceptions, one per way a request can fail.

Each carries the kernel errno the seed's ioctl would have returned, so that the one table
in broker/service/status.py can map them to gRPC and the ioctl-compatible call can return
the errno itself. Messages name the bound that was crossed and its value.
"""

from __future__ import annotations

import errno as _errno


class PasidError(Exception):
    """Base of every error the broker reports to a client."""

    errno: int = _errno.EINVAL
    reason: str = "ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(PasidError):
    """Malformed request: unknown flags, both or neither of ALLOC/FREE, argsz too small."""

    errno = _errno.EINVAL
    reason = "INVALID_ARGUMENT"


class InvalidRange(InvalidArgument):
    """min > max, or a bound at or beyond 2^pasid_bits (the review's `>=`)."""

    reason = "INVALID_RANGE"


class Exhausted(PasidError):
    """No free PASID in the requested range (the kernel's ENOSPC)."""

    errno = _errno.ENOSPC
    reason = "EXHAUSTED"


class QuotaExceeded(PasidError):
    """A quota would be crossed; `kind` is "set", "client" or "global"."""

    errno = _errno.EDQUOT
    reason = "QUOTA_EXCEEDED"

    def __init__(self, kind: str, limit: int, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.limit = limit


class Unauthenticated(PasidError):
    """No acceptable identity: a ticket unknown, replayed or expired (reason TICKET), or
    none where --anonymous refuse wants one (reason ANONYMOUS)."""

    errno = _errno.EACCES
    reason = "TICKET"

    def __init__(self, message: str, reason: str = "TICKET") -> None:
        super().__init__(message)
        self.reason = reason


class LimitExceeded(QuotaExceeded):
    """A limit on what one client may make the broker hold (sessions, watchers, request
    size, open rate): `kind` names the limit (its flag without dashes), `limit` its value.
    A QuotaExceeded, so callers that handle quotas handle these too."""

    errno = _errno.EAGAIN
    reason = "LIMIT_EXCEEDED"


class NotFound(PasidError):
    """Unknown session or set, or a token that does not match."""

    errno = _errno.ENOENT
    reason = "NOT_FOUND"


class Revoked(NotFound):
    """A resume or re-attach of a set an admin revoked: NOT_FOUND (the set is gone, as for
    any ended set), with reason REVOKED and the revoke's own words, so that a client whose
    stream's ABORTED never reached it (grpc reports a write that raced the stream's end as
    INTERNAL "Internal error from Core") still learns that the broker took its set."""

    reason = "REVOKED"


class Conflict(PasidError):
    """The request clashes with the object's state, e.g. resuming an attached session."""

    errno = _errno.EBUSY
    reason = "CONFLICT"


class Compacted(PasidError):
    """A Watch asked for a revision the event log no longer holds."""

    errno = _errno.ERANGE
    reason = "COMPACTED"

    def __init__(self, oldest: int, message: str) -> None:
        super().__init__(message)
        self.oldest = oldest


class Unsupported(PasidError):
    """The backend cannot serve PASID requests (the seed's EOPNOTSUPP / ENOTTY)."""

    errno = _errno.EOPNOTSUPP
    reason = "UNSUPPORTED"


class NotReady(PasidError):
    """The broker cannot serve yet (recovering) or any more (stopping); retry."""

    errno = _errno.EAGAIN
    reason = "NOT_READY"


class PermissionDenied(PasidError):
    """The caller may not do this: an admin call on the clients' socket, or a device
    delegated by a process that does not own it."""

    errno = _errno.EPERM
    reason = "PERMISSION_DENIED"


class BackendError(PasidError):
    """The backend failed a call it should have served; `errno` is what it returned."""

    reason = "BACKEND"

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


class DetachFailed(BackendError):
    """The kernel refused to DETACH these PASIDs from a device: they may still be in use
    there, so they must not return to the pool (Allocator.withhold)."""

    def __init__(self, err: int, message: str, pasids: tuple[int, ...]) -> None:
        super().__init__(err, message)
        self.pasids = pasids


class StoreError(PasidError):
    """The durable store could not commit; nothing was acknowledged or changed. `code`:
    SQLite's error name when SQLite raised it ("SQLITE_FULL", "SQLITE_IOERR_WRITE"), else
    "": whether the broker waits for the disk or gives up on it (docs/durability.md)."""

    errno = _errno.EIO
    reason = "STORE"

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class StoreFailed(StoreError):
    """The store can no longer be trusted (a failed fsync, an I/O error in a checkpoint):
    what the page cache held may never reach the device, so nothing more may be
    acknowledged. The broker stops serving and exits, and its restart recovers from what
    is durable (PostgreSQL's fsyncgate lesson; docs/durability.md)."""


def describe_error(exc: BaseException) -> str:
    """An exception as an operator can search for it, never empty: SQLite's code name
    (`sqlite_errorname`, duck-typed: the core imports no sqlite3), or the type's name and
    errno, then the message. MemoryError() and some OSErrors have no text of their own:
    "store commit failed: " with nothing after it named nothing (issue 22)."""
    orig = getattr(exc, "orig", None) or exc  # a SQLAlchemy wrapper's DBAPI error
    text = str(orig)
    code = getattr(orig, "sqlite_errorname", None)
    if code:
        return (
            f"{code}: {text}" if text else f"{code} (code {getattr(orig, 'sqlite_errorcode', '?')})"
        )
    name = type(orig).__name__
    err = getattr(orig, "errno", None)
    if isinstance(err, int) and err and err in _errno.errorcode:
        name = f"{name} {_errno.errorcode[err]}"
        text = getattr(orig, "strerror", None) or text
    return f"{name}: {text}" if text else name
