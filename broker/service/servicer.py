"""The gRPC adapter: decode, call the engine, encode. No rules live here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc

from broker import __version__
from broker.core import InvalidArgument, PasidError, runs
from broker.engine import Broker
from broker.engine import Session as BrokerSession
from broker.service.status import error_message, status_of, trailing_metadata

log = logging.getLogger("pasid_broker.service")

T = TypeVar("T")


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: PasidError) -> NoReturn:
    context.set_trailing_metadata(trailing_metadata(exc))
    await context.abort(status_of(exc), exc.message)
    raise AssertionError("unreachable")  # abort raises


def _set_info(sess: BrokerSession, with_ranges: bool = True) -> pb.SetInfo:
    info = pb.SetInfo(
        set_id=sess.session_id,
        session_id=sess.session_id,
        client=sess.client,
        pid=sess.pid,
        count=len(sess.set),
        created_unix=sess.created_unix,
        state="attached" if sess.attached else "detached",
    )
    if with_ranges:
        info.ranges.extend(pb.PasidRange(min=lo, max=hi) for lo, hi in runs(sess.set.pasids))
    return info


class PasidBrokerServicer(pb_grpc.PasidBrokerServicer):
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    # -- the session stream -------------------------------------------------------------

    async def Session(
        self,
        request_iterator: AsyncIterator[pb.SessionRequest],
        context: grpc.aio.ServicerContext[pb.SessionRequest, pb.SessionResponse],
    ) -> AsyncIterator[pb.SessionResponse]:
        first = await anext(request_iterator, None)
        if first is None:
            return
        if first.WhichOneof("op") != "open":
            await _abort(context, InvalidArgument("the first message of a Session must be open"))
        o = first.open
        try:
            sess, token, resumed = await self.broker.open_session(
                o.client, o.pid, o.grace_seconds, o.resume_token
            )
        except PasidError as exc:
            await _abort(context, exc)
        # Replies wait for their commits, in request order; reading goes on meanwhile so
        # that a pipelining client's requests share group commits.
        replies: asyncio.Queue[tuple[int, asyncio.Future[pb.SessionResponse]] | None]
        replies = asyncio.Queue()
        reader = asyncio.create_task(self._read(sess, request_iterator, replies))
        try:
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
                ),
            )
            while (item := await replies.get()) is not None:
                tag, fut = item
                try:
                    resp = await fut
                except PasidError as exc:
                    resp = pb.SessionResponse(error=error_message(exc))
                resp.tag = tag
                yield resp
        finally:
            reader.cancel()
            self.broker.end_session(sess, "client disconnected")

    async def _read(
        self,
        sess: BrokerSession,
        requests: AsyncIterator[pb.SessionRequest],
        replies: asyncio.Queue[tuple[int, asyncio.Future[pb.SessionResponse]] | None],
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for req in requests:
                op = req.WhichOneof("op")
                try:
                    if op in ("alloc", "free", "list") and getattr(req, op).HasField("session"):
                        raise InvalidArgument(f"{op} on a Session stream must not name a session")
                    fut = self._dispatch(sess, req, op)
                except PasidError as exc:
                    fut = loop.create_future()
                    fut.set_exception(exc)
                replies.put_nowait((req.tag, fut))
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        finally:
            replies.put_nowait(None)

    def _dispatch(
        self, sess: BrokerSession, req: pb.SessionRequest, op: str | None
    ) -> asyncio.Future[pb.SessionResponse]:
        b = self.broker
        if op == "alloc":
            a = req.alloc
            return _map(
                b.alloc(sess, a.min, a.max, a.count or 1),
                lambda got: pb.SessionResponse(alloc=pb.AllocResponse(pasids=got)),
            )
        if op == "free":
            f = req.free
            return _map(
                b.free(sess, f.min, f.max),
                lambda n: pb.SessionResponse(free=pb.FreeResponse(freed=n)),
            )
        if op == "list":
            done: asyncio.Future[pb.SessionResponse] = asyncio.get_running_loop().create_future()
            done.set_result(pb.SessionResponse(list=self._list(sess, req.list.all_sets)))
            return done
        if op == "open":
            raise InvalidArgument("this stream's session is already open")
        raise InvalidArgument("empty SessionRequest: set one of alloc, free, list")

    # -- unary calls --------------------------------------------------------------------

    async def _unary(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        ref: pb.SessionRef,
        call: Callable[[BrokerSession], Awaitable[T]],
    ) -> T:
        try:
            sess = self.broker.authenticate(ref.session_id, ref.token)
            return await call(sess)
        except PasidError as exc:
            await _abort(context, exc)

    async def Alloc(
        self, request: pb.AllocRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AllocResponse:
        got = await self._unary(
            context,
            request.session,
            lambda s: self.broker.alloc(s, request.min, request.max, request.count or 1),
        )
        return pb.AllocResponse(pasids=got)

    async def Free(
        self, request: pb.FreeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.FreeResponse:
        n = await self._unary(
            context, request.session, lambda s: self.broker.free(s, request.min, request.max)
        )
        return pb.FreeResponse(freed=n)

    async def List(
        self, request: pb.ListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListResponse:
        if request.all_sets:
            return self._list(None, True)

        async def one(s: BrokerSession) -> pb.ListResponse:
            return self._list(s, False)

        return await self._unary(context, request.session, one)

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
        )

    def _list(self, sess: BrokerSession | None, all_sets: bool) -> pb.ListResponse:
        if all_sets:
            return pb.ListResponse(sets=[_set_info(s) for s in self.broker.sessions()])
        assert sess is not None
        return pb.ListResponse(sets=[_set_info(sess)])


def _map(
    fut: asyncio.Future[T], fn: Callable[[T], pb.SessionResponse]
) -> asyncio.Future[pb.SessionResponse]:
    out: asyncio.Future[pb.SessionResponse] = asyncio.get_running_loop().create_future()

    def done(f: asyncio.Future[T]) -> None:
        if f.cancelled():
            out.cancel()
        elif (exc := f.exception()) is not None:
            out.set_exception(exc)
        else:
            out.set_result(fn(f.result()))

    fut.add_done_callback(done)
    return out
