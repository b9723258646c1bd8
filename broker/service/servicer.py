"""The gRPC adapter's unary PasidBroker calls: decode, call the engine, encode.

No rules live here. The shape of the adapter, one job a module:
- boundary.py        the error boundary: `boundary` (every RPC method wears it) is the one
                     place a PasidError becomes a gRPC status (status.py's table)
- session_stream.py  the Session stream (open, reader, replies in order, back-pressure),
                     and the state every PasidBroker call shares
- servicer.py        PasidBrokerServicer: the unary calls and Watch
- admin.py           PasidAdminServicer: the operators' calls
- messages.py        engine objects as protobuf messages (SetInfo, List, WatchEvent)

Input: every field a client sends is checked by broker/service/wire.py before use, and
what one client may make the broker hold is bounded by broker/service/limits.py; a
malformed request (INVALID_ARGUMENT) is counted and logged once per peer per interval.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from pasid.v1 import broker_pb2 as pb

from broker import __version__
from broker.core import PermissionDenied
from broker.engine import Session as BrokerSession
from broker.service import wire
from broker.service.authz import current_caller
from broker.service.boundary import boundary
from broker.service.messages import list_response, set_info, watch_event
from broker.service.session_stream import SessionStreamServicer
from broker.service.status import ADMIN_ONLY, WATCH_OWN_SETS

T = TypeVar("T")


class PasidBrokerServicer(SessionStreamServicer):
    """PasidBroker. On the admin socket (`admin=True`) List may list every set.

    The Session stream and the constructor are SessionStreamServicer's
    (session_stream.py)."""

    # -- unary calls --------------------------------------------------------------------

    async def _unary(
        self,
        ref: pb.SessionRef,
        call: Callable[[BrokerSession], Awaitable[T]],
        changes: bool = False,
    ) -> T:
        """`changes`: the call may change the set, where its stream's client cannot see."""
        sess = self._authenticate(ref)
        if changes:
            self.broker.change_by_token(sess)
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
            changes=True,
        )
        return pb.AllocResponse(pasids=got)

    @boundary
    async def Free(
        self, request: pb.FreeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.FreeResponse:
        n = await self._unary(
            request.session, lambda s: self.broker.free(s, request.min, request.max), changes=True
        )
        return pb.FreeResponse(freed=n)

    @boundary
    async def List(
        self, request: pb.ListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListResponse:
        if request.all_sets:
            if not current_caller().admin:
                raise PermissionDenied(ADMIN_ONLY)
            return list_response(self.broker, None, request)
        if request.ticket:  # a holder's own sets, to re-attach them (no tokens)
            held = self.broker.held_sets(wire.check_token(request.ticket, "ticket"), context.peer())
            return pb.ListResponse(sets=[set_info(s) for s in held])

        async def one(s: BrokerSession) -> pb.ListResponse:
            return list_response(self.broker, s, request)

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
            changes=True,
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
        # A Watch naming a session counts under that set's owner, whoever presents its
        # token (with a ticket or without): one uid's Watches of its own sets share its
        # cap (issue 20, point 6); an admin's full Watch, under the admin's identity.
        owner = self.admission.owner_of(set_id) if set_id is not None else None
        with self.admission.watching(owner or self.identity_key(context)):
            async for ev in self.broker.watch(from_revision, set_id):
                yield watch_event(ev)
