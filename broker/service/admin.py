"""PasidAdmin: the operators' calls (list every set, revoke one, set quotas, backup, list
the withheld PASIDs).

Registered only on the admin socket (and over TCP for admin certificates); its errors
go through the same boundary as PasidBroker's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
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

    @boundary
    async def Backup(
        self, request: pb.BackupRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.BackupChunk]:
        """The copy is made into a private file beside the database (the broker may write
        there, and only there, under systemd's ProtectSystem=strict), streamed, then
        removed."""
        copy = await self.broker.backup()
        if isinstance(copy, bytes):  # made in memory: its filesystem is full
            for i in range(0, max(len(copy), 1), BACKUP_CHUNK):
                yield pb.BackupChunk(
                    data=copy[i : i + BACKUP_CHUNK], total_bytes=len(copy) if i == 0 else 0
                )
            return
        try:
            total = copy.stat().st_size
            with copy.open("rb") as f:
                first = True
                while chunk := await asyncio.to_thread(f.read, BACKUP_CHUNK):
                    yield pb.BackupChunk(data=chunk, total_bytes=total if first else 0)
                    first = False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(copy)

    @boundary
    async def ListWithheld(
        self, request: pb.ListWithheldRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListWithheldResponse:
        out = pb.ListWithheldResponse()
        for row in self.broker.withheld():
            for p in row.pasids:
                out.pasids.add(
                    pasid=p,
                    kind=row.kind,
                    set_id=row.set_id or 0,
                    holder_pid=row.holder_pid or 0,
                    claimant=row.claimant or 0,
                    devices=[d for d in (row.devices or "").split(",") if d],
                )
        return out


# A chunk of a Backup stream: well under grpc's default 4 MiB message limit.
BACKUP_CHUNK = 1 << 20
