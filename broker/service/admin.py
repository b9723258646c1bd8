"""PasidAdmin: the operators' calls (list every set, revoke one, set quotas).

Registered only on the admin socket (and over TCP for admin certificates); its errors
go through the same boundary as PasidBroker's.
"""

from __future__ import annotations

from typing import Any

import grpc
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc

from broker.engine import Broker
from broker.service import wire
from broker.service.boundary import boundary
from broker.service.messages import list_page
from broker.service.servicer import PasidBrokerServicer


class PasidAdminServicer(pb_grpc.PasidAdminServicer):
    """Operators' calls; registered only on the admin socket."""

    def __init__(self, broker: Broker, main: PasidBrokerServicer) -> None:
        self.broker = broker
        self.main = main
        self.malformed = main.malformed
        self.peer_key = main.peer_key
        self.refusals = main.refusals
        self.limit_refused = main.limit_refused

    @boundary
    async def ListSets(
        self, request: pb.ListSetsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListResponse:
        return list_page(
            self.broker.sessions(), request.with_ranges, request.page_size, request.page_token
        )

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
