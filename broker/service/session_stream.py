"""The Session stream: one client's ioasid_set for as long as its stream lasts.

open first (new or resumed, durable before it is answered); then a reader task that
decodes each request and hands it to the engine, and the stream itself, which answers
in request order as each commit lands. Up to --max-inflight-per-stream requests wait
unanswered; then reading stops (back-pressure) and the client's sends stall on flow
control. A per-request error is a reply (status.error_message), not the stream's end;
the stream ends with a status only when the broker takes the set (revoke: ABORTED) or
shuts down (UNAVAILABLE).

How a stream ends is an event of the set's lifecycle (broker/engine/lifecycle.py): a
ReleaseRequest, or a half-close (the request iterator ends normally), is its client's
explicit end; anything else (cancelled, connection broken, client killed, generator
closed) is a broken stream, which only detaches a verified holder's set. grpc.aio reports
a broken stream to the reader as the same end-of-requests as a half-close, so a
half-close counts only once the broker's answer to it (SessionResponse tag 0, `release`)
was written: on a broken stream that write fails and the generator is closed instead.

PasidBrokerServicer (servicer.py) adds the unary calls to this class; the servicer's
state (engine, limits, identity) is set up here because the stream uses all of it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc

from broker.core import (
    ANONYMOUS,
    InvalidArgument,
    LimitExceeded,
    PasidError,
    PermissionDenied,
    runs,
    uid_identity,
)
from broker.engine import Broker, SetEvent, SetNotice, done_future
from broker.engine import Session as BrokerSession
from broker.engine.lifecycle import action_for
from broker.service import wire
from broker.service.authz import current_caller
from broker.service.boundary import Refusals, boundary, end_stream
from broker.service.limits import Admission, Limits
from broker.service.messages import list_response
from broker.service.status import ADMIN_ONLY, error_message

# A session-stream request awaiting its reply: tag, the engine's future, how its result
# becomes the reply, op, arrival (perf_counter). The writer encodes once the future is
# done: no second future and callback per request.
_Pending = tuple[int, asyncio.Future[Any], Callable[[Any], pb.SessionResponse], str | None, float]


# What the Session writer loop reads: a reply to await, or the end of the stream with a
# status (revoke: ABORTED; broker shutdown: UNAVAILABLE).
def ranges(pasids: list[int]) -> list[pb.PasidRange]:
    return [pb.PasidRange(min=lo, max=hi) for lo, hi in runs(pasids)]


@dataclass(frozen=True)
class _End:
    code: grpc.StatusCode
    message: str


@dataclass(frozen=True)
class _Notice:
    """Something the engine tells the session's client unprompted (tag 0)."""

    resp: pb.SessionResponse


_Item = _Pending | _End | _Notice | None


@dataclass
class _Ending:
    """What the reader saw of the stream's end: the requests ended normally (`eof`: a
    half-close, or a broken stream grpc reported the same way), or a release request
    was taken (`released`)."""

    eof: bool = False
    released: bool = False


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


def _release_reply(freed: int) -> pb.SessionResponse:
    return pb.SessionResponse(release=pb.ReleaseResponse(freed=freed))


def _notice(n: SetNotice) -> _Notice:
    return _Notice(
        pb.SessionResponse(
            tag=0,
            notice=pb.Notice(
                kind=n.kind,
                pasids=ranges(list(n.pasids)),
                other_set_id=n.other_set,
                reason=n.reason,
                received=n.received,
            ),
        )
    )


def _as_is(resp: pb.SessionResponse) -> pb.SessionResponse:
    return resp


def _ignore_limit(limit: str) -> None:
    pass


class SessionStreamServicer(pb_grpc.PasidBrokerServicer):
    """PasidBroker's Session stream, and the state every PasidBroker call shares."""

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
        # The metrics' request latency for Session/<op> (broker/metrics/registry.py).
        self._op_done = session_op_done or _ignore_op
        # Shared by the servicers of every socket: limits count per identity, not socket.
        self.admission = admission or Admission(Limits())
        self.limits = self.admission.limits
        self.malformed = malformed or wire.MalformedRequests()
        self.refusals = Refusals()
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
        new_set = not o.resume_token and not o.reattach_set_id
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
                reattach_set_id=o.reattach_set_id,
                held=wire.pasids_of(o.held) if o.witness else None,
                complete_epoch=o.witness_epoch if o.witness and o.witness_complete else 0,
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
        # Told between replies, in the order it happens (after the open's answer).
        sess.on_notice = lambda n: replies.put_nowait(_notice(n))
        self._streams.add(replies)
        reader: asyncio.Task[None] | None = None
        end: _End | None = None
        ending = _Ending()
        # The open's reply was handed to grpc: from then on its client may know that it
        # holds the set, and a broken stream detaches it instead of destroying it.
        answered = False
        # The stream's end was its client's own (a release taken, a half-close answered).
        explicit = False
        try:
            await created  # durable before it is acknowledged
            self._op_done("open", t_open)
            peer = self.peer_key(context)
            reader = asyncio.create_task(
                self._read(sess, request_iterator, replies, inflight, peer, ending)
            )
            # Counted as known BEFORE the yield: grpc closes this generator at the yield
            # when the stream is cancelled while the reply is being sent, even once the
            # reply has reached the client (a client that reads `opened` and cancels at
            # once lost 8 sets in 90 when this was set after it). Which side of that
            # moment a broken stream fell on cannot be known, and a set its client knows
            # must never be destroyed by a broken stream; so only a stream that broke
            # before the reply was sent (while the open was committing) leaves nothing.
            answered = True
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
                    reclaimed=ranges(sess.reclaimed) if resumed else [],
                    conflicts=ranges(sess.conflicts) if resumed else [],
                    refreed=ranges(sess.refreed) if resumed else [],
                    witness_complete=resumed and sess.witness_complete,
                    contested=ranges(self.broker.contested_in(sess)) if resumed else [],
                    # A new set's epoch, or the one a complete witness stated: the client
                    # knows the whole set with it. Otherwise it learns it from a listing.
                    witness_epoch=sess.tell_witness_epoch()
                    if not resumed or sess.witness_complete
                    else 0,
                ),
            )
            while (item := await replies.get()) is not None:
                if isinstance(item, _Notice):
                    yield item.resp
                    if end is not None and replies.empty():
                        reader.cancel()  # shutdown, and nothing more owed
                    continue
                if isinstance(item, _End):
                    end = item
                    if end.code is grpc.StatusCode.ABORTED:
                        break
                    # Shutdown: answer what was asked, then end. Reading goes on while
                    # replies are owed, so that a release or a half-close sent meanwhile
                    # is honoured (the engine refuses any other request while stopping).
                    if replies.empty():
                        reader.cancel()
                    continue
                tag, fut, reply, op, t0 = item
                try:
                    resp = reply(await fut)
                except PasidError as exc:
                    if not isinstance(exc, InvalidArgument):  # malformed: logged in _read
                        self.refusals.log(
                            exc,
                            peer,
                            rpc="Session",
                            op=op,
                            session=sess.session_id,
                            client=sess.client,
                        )
                    resp = pb.SessionResponse(error=error_message(exc))
                self._op_done(op, t0)
                resp.tag = tag
                yield resp
                inflight.release()
                if end is not None and replies.empty():
                    reader.cancel()  # shutdown, and nothing more owed
            explicit = ending.released
            shutdown = end is not None and end.code is grpc.StatusCode.UNAVAILABLE
            ended = (end is None or shutdown) and ending.eof and not ending.released
            if ended and self._half_close_ends(sess):
                # A half-close, or a broken stream that grpc reported as one: the answer's
                # write tells them apart (on a broken stream it fails, and this generator
                # is closed at the yield).
                yield _release_reply(len(sess.set))
                explicit = True
                sess.on_revoke = None
                sess.on_notice = None
                done = self.broker.end_session(
                    sess, "client released the set (half-closed its stream)", SetEvent.HALF_CLOSE
                )
                if done is not None:
                    await done  # durable before the stream ends OK
            if explicit and shutdown:
                end = None  # its client ended it: OK, not "resume after the restart"
        finally:
            if reader is not None:
                reader.cancel()
            self._streams.discard(replies)
            sess.on_revoke = None
            sess.on_notice = None
            if not explicit:
                if answered or resumed:
                    self.broker.end_session(sess, "client disconnected", SetEvent.STREAM_BROKEN)
                else:
                    self.broker.end_session(
                        sess,
                        "client disconnected before its open's reply was sent",
                        SetEvent.OPEN_ABANDONED,
                    )
        if end is not None:
            await end_stream(context, end.code, end.message)

    @staticmethod
    def _half_close_ends(sess: BrokerSession) -> bool:
        """Whether a half-close does to this set what a broken stream does not (a
        verified holder's set): only then must the two be told apart."""
        verified = sess.holder is not None
        return action_for(verified, SetEvent.HALF_CLOSE) is not action_for(
            verified, SetEvent.STREAM_BROKEN
        )

    async def _read(
        self,
        sess: BrokerSession,
        requests: AsyncIterator[pb.SessionRequest | wire.Malformed],
        replies: asyncio.Queue[_Item],
        inflight: asyncio.Semaphore,
        peer: str,
        ending: _Ending,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                # A slot before reading the next request: with none free the stream is
                # not read, and the client's sends stall on flow control.
                await inflight.acquire()
                req = await anext(requests, None)
                if req is None:
                    ending.eof = True
                    break
                released = False
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
                    released = op == "release"
                except PasidError as exc:
                    if isinstance(exc, InvalidArgument):
                        self.malformed.report(f"Session/{op or 'malformed'}", peer, exc.message)
                    elif isinstance(exc, LimitExceeded):
                        self.limit_refused(exc.kind)
                    fut = loop.create_future()
                    fut.set_exception(exc)
                    reply = _as_is
                replies.put_nowait((tag, fut, reply, op, t0))
                if released:  # the set is gone: nothing after a release is read
                    ending.released = True
                    break
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
            resp = pb.SessionResponse(list=list_response(b, sess, req.list))
            return done_future(resp), _as_is
        if op == "release":
            return b.release(sess), _release_reply
        if op == "open":
            raise InvalidArgument("this stream's session is already open")
        raise InvalidArgument(
            "empty SessionRequest: set one of alloc, free, list, request, release"
        )
