"""The error boundary: the one place a PasidError becomes a gRPC status (issue 12).

Every RPC method of both servicers wears `boundary`; the status and its trailing metadata
come from broker/service/status.py's table. A Session stream's per-request errors are
replies, not statuses (session_stream.py), but are logged by the same `Refusals`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, TypeVar, cast

import grpc
from pasid.v1 import broker_pb2 as pb

from broker.core import InvalidArgument, LimitExceeded, PasidError, QuotaExceeded
from broker.logs import LogThrottle
from broker.service import wire
from broker.service.status import status_of, trailing_metadata

log = logging.getLogger("pasid_broker.service")


class Refusals:
    """Every refused request is logged at INFO with its reason, so that the operator asked
    why a VMM got no PASID finds what the client was told (quota and limit, bad token,
    ...); but per peer (identity and address) only a burst of lines and then about one a
    second, and a few times that over all peers, each line saying how many were held
    back (`suppressed`): a client refused in a loop cannot grow the log faster than that
    (issue 20, point 5). Never a token: `context` holds ids and names only."""

    def __init__(self, burst: int = 10, interval: float = 10.0) -> None:
        self._throttle = LogThrottle(burst, interval)

    def log(self, exc: PasidError, peer: str, **context: object) -> None:
        suppressed = self._throttle.allow(peer)
        if suppressed is None:
            return
        fields: dict[str, object] = {
            "reason": exc.reason,
            "code": status_of(exc).name,
            "errno": exc.errno,
            "peer": peer,
            **context,
        }
        if isinstance(exc, QuotaExceeded):
            fields.update(quota=exc.kind, limit=exc.limit)
        if suppressed:
            fields["suppressed"] = suppressed
        log.info("refused: %s", exc.message, extra=fields)


def _session_named(request: Any) -> dict[str, object]:
    """The session a unary request names (the claimed id; its token is never logged)."""
    ref = getattr(request, "session", None)
    return {"session": ref.session_id} if isinstance(ref, pb.SessionRef) else {}


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any],
    exc: PasidError,
    refusals: Refusals | None,
    peer: str,
    **fields: object,
) -> NoReturn:
    if refusals is not None:  # None: a malformed request, logged by MalformedRequests
        refusals.log(exc, peer, **fields)
    context.set_trailing_metadata(trailing_metadata(exc))
    await context.abort(status_of(exc), exc.message)
    raise AssertionError("unreachable")  # abort raises


F = TypeVar("F", bound=Callable[..., Any])


def _refused(self: Any, name: str, context: Any, exc: PasidError) -> bool:
    """A malformed request (INVALID_ARGUMENT) is counted and logged, rate-limited (True:
    logged here, not once per request); a limit's refusal is counted."""
    if isinstance(exc, InvalidArgument):
        self.malformed.report(name, self.peer_key(context), exc.message)
        return True
    if isinstance(exc, LimitExceeded):
        self.limit_refused(exc.kind)
    return False


async def _fail(self: Any, name: str, request: Any, context: Any, exc: Exception) -> NoReturn:
    """End the call for `exc`: a PasidError with its status (a refusal), anything else as
    INTERNAL (a bug, not the client's doing: logged with its traceback)."""
    if isinstance(exc, PasidError):
        quiet = _refused(self, name, context, exc)
        refusals = None if quiet else self.refusals
        peer = self.peer_key(context)
        await _abort(context, exc, refusals, peer, rpc=name, **_session_named(request))
    log.error("internal error in %s", name, exc_info=exc, extra={"method": name})
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the broker's log")
    raise AssertionError("unreachable")  # abort raises


async def end_stream(context: Any, code: grpc.StatusCode, message: str) -> NoReturn:
    """Abort a Session stream the broker ended (its set reclaimed). When the holder died,
    its pidfd often wakes the broker before grpc has seen the socket close: the status
    cannot be sent, and grpc raises a bare Exception (ExecuteBatchError). That is the
    peer gone, not a bug: end the call as cancelled (grpc logs that at debug) instead of
    two logged tracebacks per dead client in the middle of a mass release."""
    try:
        await context.abort(code, message)
    except grpc.aio.AbortError:
        raise
    except Exception as exc:
        log.debug("stream's peer already gone: %s", exc)
        raise asyncio.CancelledError from exc
    raise AssertionError("unreachable")  # abort raises


def boundary(method: F) -> F:
    """The error boundary: a PasidError raised by an RPC method (a coroutine or an async
    generator taking (self, request, context)) ends the call with its gRPC status and
    trailing metadata. The one place this happens. A request that did not decode
    (wire.Malformed) is refused here before the method sees it."""
    name = method.__name__
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                if isinstance(request, wire.Malformed):
                    raise InvalidArgument(request.error)
                # aclosing: a client gone mid-stream closes the method's generator now
                # (its finally ends the session), not whenever it is collected.
                async with contextlib.aclosing(method(self, request, context)) as items:
                    async for item in items:
                        yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _fail(self, name, request, context, exc)

        return cast(F, stream)

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: Any) -> Any:
        try:
            if isinstance(request, wire.Malformed):
                raise InvalidArgument(request.error)
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _fail(self, name, request, context, exc)

    return cast(F, unary)
