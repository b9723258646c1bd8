"""The gRPC adapter: decode, call the engine, encode. No rules live here.

Errors: methods raise PasidError; `boundary` (every RPC method wears it) is the one place
where one becomes a gRPC status, through broker/service/status.py's table. A Session
stream's per-request errors are replies (status.error_message), not statuses.

Input: every field a client sends is checked by broker/service/wire.py before use, and
what one client may make the broker hold is bounded by broker/service/limits.py; a
malformed request (INVALID_ARGUMENT) is counted and logged once per peer per interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar, cast

import grpc
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc

from broker import __version__
from broker.core import (
    ANONYMOUS,
    InvalidArgument,
    LimitExceeded,
    PasidError,
    PermissionDenied,
    QuotaExceeded,
    runs,
    uid_identity,
)
from broker.engine import Broker, done_future
from broker.engine import Session as BrokerSession
from broker.service import wire
from broker.service.authz import current_caller
from broker.service.limits import Admission, Limits
from broker.service.status import (
    ADMIN_ONLY,
    WATCH_OWN_SETS,
    error_message,
    status_of,
    trailing_metadata,
)
from broker.store import Event

log = logging.getLogger("pasid_broker.service")

T = TypeVar("T")
# A session-stream request awaiting its reply: tag, the engine's future, how its result
# becomes the reply, op, arrival (perf_counter). The writer encodes once the future is
# done: no second future and callback per request.
_Pending = tuple[int, asyncio.Future[Any], Callable[[Any], pb.SessionResponse], str | None, float]


# What the Session writer loop reads: a reply to await, or the end of the stream with a
# status (revoke: ABORTED; broker shutdown: UNAVAILABLE).
@dataclass(frozen=True)
class _End:
    code: grpc.StatusCode
    message: str


_Item = _Pending | _End | None


def log_refusal(exc: PasidError, **context: object) -> None:
    """Every refused request once, at INFO, with its reason: the operator asked why a VMM
    got no PASID finds what the client was told (quota and limit, bad token, ...).
    Never a token: `context` holds ids and names only."""
    fields: dict[str, object] = {
        "reason": exc.reason,
        "code": status_of(exc).name,
        "errno": exc.errno,
        **context,
    }
    if isinstance(exc, QuotaExceeded):
        fields.update(quota=exc.kind, limit=exc.limit)
    log.info("refused: %s", exc.message, extra=fields)


def _session_named(request: Any) -> dict[str, object]:
    """The session a unary request names (the claimed id; its token is never logged)."""
    ref = getattr(request, "session", None)
    return {"session": ref.session_id} if isinstance(ref, pb.SessionRef) else {}


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any],
    exc: PasidError,
    quiet: bool = False,
    **fields: object,
) -> NoReturn:
    if not quiet:  # a malformed request is logged by MalformedRequests, rate-limited
        log_refusal(exc, peer=context.peer(), **fields)
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


async def _internal(context: Any, name: str, exc: Exception) -> NoReturn:
    # A bug, not the client's doing: logged with its traceback, answered INTERNAL.
    log.error("internal error in %s", name, exc_info=exc, extra={"method": name})
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the broker's log")
    raise AssertionError("unreachable")  # abort raises


async def _end_stream(context: Any, code: grpc.StatusCode, message: str) -> NoReturn:
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
            except PasidError as exc:
                quiet = _refused(self, name, context, exc)
                await _abort(context, exc, quiet, rpc=method.__name__, **_session_named(request))
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _internal(context, name, exc)

        return cast(F, stream)

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: Any) -> Any:
        try:
            if isinstance(request, wire.Malformed):
                raise InvalidArgument(request.error)
            return await method(self, request, context)
        except PasidError as exc:
            quiet = _refused(self, name, context, exc)
            await _abort(context, exc, quiet, rpc=method.__name__, **_session_named(request))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _internal(context, name, exc)

    return cast(F, unary)


def _set_info(sess: BrokerSession, with_ranges: bool = True) -> pb.SetInfo:
    info = pb.SetInfo(
        set_id=sess.session_id,
        session_id=sess.session_id,
        client=sess.client,
        pid=sess.pid,
        count=len(sess.set),
        created_unix=sess.created_unix,
        state="attached" if sess.attached else "detached",
        peer=sess.peer,
        quota=sess.set.quota,
        grace_seconds=sess.grace_seconds,
    )
    h = sess.holder
    if h is not None:
        info.verified = True
        info.uid = h.uid
        info.ns_pid = h.ns_pid
        info.delegated_by_pid = h.delegated_by_pid
    if with_ranges:
        info.ranges.extend(pb.PasidRange(min=lo, max=hi) for lo, hi in runs(sess.set.pasids))
    return info


def _ignore_op(op: str | None, t0: float) -> None:
    pass


# How an engine result becomes a Session reply (module functions: no closure per request).
def _alloc_reply(got: list[int]) -> pb.SessionResponse:
    resp = pb.SessionResponse()
    resp.alloc.pasids.extend(got)  # not AllocResponse(...) copied in: 0.5 µs less
    return resp


def _free_reply(n: int) -> pb.SessionResponse:
    return pb.SessionResponse(free=pb.FreeResponse(freed=n))


def _request_reply(ret: int) -> pb.SessionResponse:
    return pb.SessionResponse(request=pb.PasidRequestReply(ret=ret))


def _as_is(resp: pb.SessionResponse) -> pb.SessionResponse:
    return resp


def _ignore_limit(limit: str) -> None:
    pass


class PasidBrokerServicer(pb_grpc.PasidBrokerServicer):
    """PasidBroker. On the admin socket (`admin=True`) List may list every set."""

    def __init__(
        self,
        broker: Broker,
        *,
        admin: bool = False,
        session_op_done: Callable[[str | None, float], None] | None = None,
        admission: Admission | None = None,
        malformed: wire.MalformedRequests | None = None,
        limit_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.broker = broker
        self.admin = admin
        # Told when a stream request's reply is ready: (op, perf_counter() at arrival).
        # The metrics' request latency for Session/<op> (broker/metrics.py).
        self._op_done = session_op_done or _ignore_op
        # Shared by the servicers of every socket: limits count per identity, not socket.
        self.admission = admission or Admission(Limits())
        self.limits = self.admission.limits
        self.malformed = malformed or wire.MalformedRequests()
        # Told the limit's name when a request is refused by one (the metrics' counter).
        self.limit_refused = limit_refused or _ignore_limit
        self._streams: set[asyncio.Queue[_Item]] = set()

    def identity_key(self, context: grpc.aio.ServicerContext[Any, Any], ticket: str = "") -> str:
        """The identity per-identity limits count under (limits.py): the call's
        (authz.py: its pasid-ticket's uid, or its certificate's subject), else the uid of
        an OpenSession.ticket, looked at without being used up; else ANONYMOUS."""
        caller = current_caller().identity  # the call's pasid-ticket or certificate
        if caller != ANONYMOUS or not ticket:
            return caller
        uid = self.broker.ticket_uid(ticket)
        return ANONYMOUS if uid is None else uid_identity(uid)

    def peer_key(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """Who malformed-request logs are rate-limited for: identity and address."""
        return f"{self.identity_key(context)}@{context.peer()}"

    def shutdown(self) -> None:
        """End every session stream once its in-flight requests are answered; the sets
        stay (a broker restart is not the client's exit) for the client to resume."""
        for q in self._streams:
            q.put_nowait(
                _End(
                    grpc.StatusCode.UNAVAILABLE,
                    "broker is shutting down; resume the session with its token",
                )
            )

    # -- the session stream -------------------------------------------------------------

    @boundary
    async def Session(
        self,
        request_iterator: AsyncIterator[pb.SessionRequest],
        context: grpc.aio.ServicerContext[pb.SessionRequest, pb.SessionResponse],
    ) -> AsyncIterator[pb.SessionResponse]:
        first = await anext(request_iterator, None)
        if first is None:
            return
        if isinstance(first, wire.Malformed):
            raise InvalidArgument(first.error)
        if first.WhichOneof("op") != "open":
            raise InvalidArgument("the first message of a Session must be open")
        o = first.open
        t_open = time.perf_counter()
        wire.check_client_name(o.client, self.limits)
        wire.check_pid(o.pid)
        wire.check_token(o.resume_token, "resume_token")
        key = self.identity_key(context, o.ticket)
        new_set = not o.resume_token
        self.admission.admit_open(key, new_set)
        # Atomic open: the set exists once open_session returns, and this stream owns it
        # from that instant: no await until the try whose finally ends the session.
        try:
            sess, token, resumed, created = self.broker.open_session(
                o.client,
                o.pid,
                o.grace_seconds,
                o.resume_token,
                context.peer(),
                o.ticket,
                owner=current_caller().identity,
            )
        except BaseException:
            if new_set:
                self.admission.open_failed(key)
            raise
        if new_set:
            self.admission.opened(sess.session_id, key, created)
        # Replies wait for their commits, in request order; reading goes on meanwhile so
        # that a pipelining client's requests share group commits, up to
        # --max-inflight-per-stream unanswered: then reading stops (back-pressure).
        replies: asyncio.Queue[_Item] = asyncio.Queue()
        inflight = asyncio.Semaphore(self.limits.max_inflight_per_stream or 2**31)
        sess.on_revoke = lambda why: replies.put_nowait(_End(grpc.StatusCode.ABORTED, why))
        self._streams.add(replies)
        reader: asyncio.Task[None] | None = None
        end: _End | None = None
        try:
            await created  # durable before it is acknowledged
            self._op_done("open", t_open)
            reader = asyncio.create_task(
                self._read(sess, request_iterator, replies, inflight, self.peer_key(context))
            )
            yield pb.SessionResponse(
                tag=first.tag,
                opened=pb.SessionOpened(
                    session_id=sess.session_id,
                    set_id=sess.session_id,
                    token=token,
                    pasid_bits=self.broker.allocator.pasid_bits,
                    quota=sess.set.quota,
                    resumed=resumed,
                    grace_seconds=sess.grace_seconds,
                    verified=sess.holder is not None,
                ),
            )
            while (item := await replies.get()) is not None:
                if isinstance(item, _End):
                    end = item
                    if end.code is grpc.StatusCode.ABORTED:
                        break
                    reader.cancel()  # shutdown: answer what was asked, then end
                    continue
                tag, fut, reply, op, t0 = item
                try:
                    resp = reply(await fut)
                except PasidError as exc:
                    if not isinstance(exc, InvalidArgument):  # malformed: logged in _read
                        log_refusal(
                            exc, rpc="Session", op=op, session=sess.session_id, client=sess.client
                        )
                    resp = pb.SessionResponse(error=error_message(exc))
                self._op_done(op, t0)
                resp.tag = tag
                yield resp
                inflight.release()
        finally:
            if reader is not None:
                reader.cancel()
            self._streams.discard(replies)
            sess.on_revoke = None
            self.broker.end_session(sess, "client disconnected")
        if end is not None:
            await _end_stream(context, end.code, end.message)

    async def _read(
        self,
        sess: BrokerSession,
        requests: AsyncIterator[pb.SessionRequest | wire.Malformed],
        replies: asyncio.Queue[_Item],
        inflight: asyncio.Semaphore,
        peer: str,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                # A slot before reading the next request: with none free the stream is
                # not read, and the client's sends stall on flow control.
                await inflight.acquire()
                req = await anext(requests, None)
                if req is None:
                    break
                t0 = time.perf_counter()
                op: str | None = None
                tag = 0
                try:
                    if isinstance(req, wire.Malformed):
                        raise InvalidArgument(req.error)
                    tag = req.tag
                    op = req.WhichOneof("op")
                    if op in ("alloc", "free", "list", "request") and getattr(req, op).HasField(
                        "session"
                    ):
                        raise InvalidArgument(f"{op} on a Session stream must not name a session")
                    fut, reply = self._dispatch(sess, req, op)
                except PasidError as exc:
                    if isinstance(exc, InvalidArgument):
                        self.malformed.report(f"Session/{op or 'malformed'}", peer, exc.message)
                    elif isinstance(exc, LimitExceeded):
                        self.limit_refused(exc.kind)
                    fut = loop.create_future()
                    fut.set_exception(exc)
                    reply = _as_is
                replies.put_nowait((tag, fut, reply, op, t0))
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        finally:
            replies.put_nowait(None)

    def _dispatch(
        self, sess: BrokerSession, req: pb.SessionRequest, op: str | None
    ) -> tuple[asyncio.Future[Any], Callable[[Any], pb.SessionResponse]]:
        """The engine's future for this request, and how its result becomes the reply."""
        b = self.broker
        if op == "alloc":
            a = req.alloc
            return (
                b.alloc(sess, a.min, a.max, wire.check_count(a.count, self.limits), a.device),
                _alloc_reply,
            )
        if op == "free":
            f = req.free
            return b.free(sess, f.min, f.max), _free_reply
        if op == "request":
            r = req.request
            return b.pasid_request(sess, r.argsz, r.flags, r.min, r.max), _request_reply
        if op == "list":
            if req.list.all_sets and not current_caller().admin:
                raise PermissionDenied(ADMIN_ONLY)
            resp = pb.SessionResponse(list=self._list(sess, req.list.all_sets))
            return done_future(resp), _as_is
        if op == "open":
            raise InvalidArgument("this stream's session is already open")
        raise InvalidArgument("empty SessionRequest: set one of alloc, free, list")

    # -- unary calls --------------------------------------------------------------------

    async def _unary(self, ref: pb.SessionRef, call: Callable[[BrokerSession], Awaitable[T]]) -> T:
        sess = self._authenticate(ref)
        return await call(sess)

    def _authenticate(self, ref: pb.SessionRef) -> BrokerSession:
        return self.broker.authenticate(ref.session_id, wire.check_token(ref.token))

    @boundary
    async def Alloc(
        self, request: pb.AllocRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AllocResponse:
        count = wire.check_count(request.count, self.limits)
        got = await self._unary(
            request.session,
            lambda s: self.broker.alloc(s, request.min, request.max, count, request.device),
        )
        return pb.AllocResponse(pasids=got)

    @boundary
    async def Free(
        self, request: pb.FreeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.FreeResponse:
        n = await self._unary(
            request.session, lambda s: self.broker.free(s, request.min, request.max)
        )
        return pb.FreeResponse(freed=n)

    @boundary
    async def List(
        self, request: pb.ListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListResponse:
        if request.all_sets:
            if not current_caller().admin:
                raise PermissionDenied(ADMIN_ONLY)
            return self._list(None, True)

        async def one(s: BrokerSession) -> pb.ListResponse:
            return self._list(s, False)

        return await self._unary(request.session, one)

    @boundary
    async def GetInfo(
        self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetInfoResponse:
        i = self.broker.info()
        return pb.GetInfoResponse(
            backend=i.backend,
            pasid_bits=i.pasid_bits,
            capacity=i.capacity,
            in_use=i.in_use,
            reserved=i.reserved,
            quarantined=i.quarantined,
            sessions=i.sessions,
            sets=i.sets,
            quotas=pb.Quotas(
                per_set=i.quotas.per_set,
                per_client=i.quotas.per_client,
                **{"global": i.quotas.global_},
            ),
            version=__version__,
            revision=i.revision,
            widths=[
                pb.PasidWidth(kind=k, name=n, pasid_bits=b, set_id=s) for k, n, b, s in i.widths
            ],
        )

    @boundary
    async def PasidRequest(
        self, request: pb.PasidRequestMessage, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PasidRequestReply:
        r = request
        ret = await self._unary(
            r.session,
            lambda s: self.broker.pasid_request(s, r.argsz, r.flags, r.min, r.max),
        )
        return pb.PasidRequestReply(ret=ret)

    def _watched_set(self, request: pb.WatchRequest) -> int | None:
        """Which set's events this caller sees: the set its session names (id and token);
        without one, every set's (None) for an admin (authz.py, per call), and for
        anyone else PERMISSION_DENIED."""
        if request.HasField("session"):  # named: that set only, whoever asks
            return self._authenticate(request.session).session_id
        if current_caller().admin:
            return None
        raise PermissionDenied(WATCH_OWN_SETS)

    @boundary
    async def Watch(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchEvent]:
        from_revision = wire.check_revision(request.from_revision)
        set_id = self._watched_set(request)
        with self.admission.watching(self.identity_key(context)):
            async for ev in self.broker.watch(from_revision, set_id):
                yield self._watch_event(ev)

    @staticmethod
    def _watch_event(ev: Event) -> pb.WatchEvent:
        return pb.WatchEvent(
            revision=ev.revision,
            ts_unix=ev.ts,
            kind=ev.kind,
            set_id=ev.set_id,
            pasids=[pb.PasidRange(min=lo, max=hi) for lo, hi in runs(ev.pasids)],
            reason=ev.reason,
            verified=ev.uid is not None,
            pid=ev.pid or 0,
            uid=ev.uid or 0,
            ns_pid=ev.ns_pid or 0,
        )

    def _list(self, sess: BrokerSession | None, all_sets: bool) -> pb.ListResponse:
        if all_sets:
            return pb.ListResponse(sets=[_set_info(s) for s in self.broker.sessions()])
        assert sess is not None
        return pb.ListResponse(sets=[_set_info(sess)])


class PasidAdminServicer(pb_grpc.PasidAdminServicer):
    """Operators' calls; registered only on the admin socket."""

    def __init__(self, broker: Broker, main: PasidBrokerServicer) -> None:
        self.broker = broker
        self.main = main
        self.malformed = main.malformed
        self.peer_key = main.peer_key
        self.limit_refused = main.limit_refused

    @boundary
    async def ListSets(
        self, request: pb.ListSetsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListResponse:
        sessions = self.broker.sessions()
        return pb.ListResponse(sets=[_set_info(s, request.with_ranges) for s in sessions])

    @boundary
    async def RevokeSet(
        self, request: pb.RevokeSetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RevokeSetResponse:
        freed = await self.broker.revoke(request.set_id, wire.check_reason(request.reason))
        return pb.RevokeSetResponse(freed=freed)

    @boundary
    async def SetQuotas(
        self, request: pb.SetQuotasRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetInfoResponse:
        q = request.quotas
        await self.broker.set_quotas(request.set_id, q.per_set, q.per_client, getattr(q, "global"))
        return await self.main.GetInfo(pb.GetInfoRequest(), context)
