"""Client library for pasid-broker: AsyncClient/AsyncSession, and the Client/Session facade.

A session is an ioasid_set: open it for as long as you need its PASIDs; closing it (or
dying) frees them. It outlives a broker restart: it reconnects and resumes by itself
(reconnect.py; `on_state_change` tells). Failures raise PasidClientError subclasses
carrying the gRPC status.
"""

from pasid_client.address import Tls
from pasid_client.aio import AsyncClient, AsyncSession
from pasid_client.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    InvalidRange,
    NotFound,
    OutcomeUnknown,
    OutOfRange,
    PasidClientError,
    PermissionDenied,
    QuotaExceeded,
    ResourceExhausted,
    Revoked,
    SessionLost,
    Unauthenticated,
    Unavailable,
)
from pasid_client.handshake import Ticket, obtain_ticket
from pasid_client.reconnect import SessionState, StateChange
from pasid_client.sync import Client, Session
from pasid_client.types import ALL, Event, Info, Quotas, SetView, WithheldView

__all__ = [
    "ALL",
    "Aborted",
    "AsyncClient",
    "AsyncSession",
    "Client",
    "Event",
    "FailedPrecondition",
    "Info",
    "InvalidArgument",
    "InvalidRange",
    "NotFound",
    "OutOfRange",
    "OutcomeUnknown",
    "PasidClientError",
    "PermissionDenied",
    "QuotaExceeded",
    "Quotas",
    "ResourceExhausted",
    "Revoked",
    "Session",
    "SessionLost",
    "SessionState",
    "SetView",
    "StateChange",
    "Ticket",
    "Tls",
    "Unauthenticated",
    "Unavailable",
    "WithheldView",
    "obtain_ticket",
]
