"""Who is calling, and may they: identity and authorisation on every call.

One interceptor per listener works out the caller once per call and checks admin calls
before any servicer code runs:

- Unix sockets: the kernel-verified peer (uid, gid, groups of the process) carried by a
  one-time ticket in the `pasid-ticket` call metadata, obtained on the peer socket
  (docs/peer-identity.md). No ticket: the shared identity 'anonymous'.
- TCP with mutual TLS: the client certificate's subject (RFC 2253, as grpc reports it).
- Plain TCP (--insecure, loopback only): 'anonymous'.

Admin calls (PasidAdmin, List all_sets, the full Watch) need uid 0, the broker's own uid
or a member of --admin-group on a Unix socket, or an --admin-subject certificate on TCP.
The identity is also the key of the per-identity quota: a client cannot rename its way
out of it.
"""

from __future__ import annotations

import contextlib
import contextvars
import grp
import logging
import os
import select
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from broker.core import ANONYMOUS, uid_identity, x509_identity
from broker.service.interceptors import behaviour, rebuild

log = logging.getLogger("pasid_broker.authz")

TICKET_METADATA = "pasid-ticket"
ADMIN_SERVICE = "/pasid.v1.PasidAdmin/"
# Health checks and reflection answer anyone who can reach the listener (probes).
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class Caller:
    """The caller of one RPC, as the broker verified it."""

    identity: str  # "uid:1000", "x509:CN=vmm-3,O=example", or "anonymous"
    admin: bool = False
    uid: int | None = None
    subject: str | None = None

    @property
    def anonymous(self) -> bool:
        return self.identity == ANONYMOUS


ANONYMOUS_CALLER = Caller(ANONYMOUS)


class Peer(Protocol):
    """What a ticket vouches for (broker.peer's PeerIdentity fits)."""

    pid: int
    uid: int
    gid: int
    pidfd: int

    @property
    def delegated(self) -> bool:
        """The process (pid, pidfd) is a delegate: uid and gid are its delegator's."""
        ...

    def close(self) -> None: ...


class TicketError(Exception):
    """The ticket is unknown, used or expired; the message says which."""


TakeTicket = Callable[[str], Peer]

_current: contextvars.ContextVar[Caller] = contextvars.ContextVar(
    "pasid_caller", default=ANONYMOUS_CALLER
)


def current_caller() -> Caller:
    """The caller of the RPC being served (set by the Authorizer around the handler)."""
    return _current.get()


def process_groups(pid: int, pidfd: int) -> frozenset[int]:
    """The supplementary groups of a verified process, from the kernel (/proc/<pid>/status
    Groups:), read while its pidfd shows it alive, so a reused pid cannot answer."""
    groups: frozenset[int] = frozenset()
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Groups:"):
                groups = frozenset(int(g) for g in line.split()[1:])
                break
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    if p.poll(0):  # readable: the process has exited, the pid may be someone else's
        return frozenset()
    return groups


def resolve_groups(names: Iterable[str]) -> frozenset[int]:
    """Group names or numbers -> gids; ValueError names an unknown group."""
    out: set[int] = set()
    for n in names:
        if n.isdigit():
            out.add(int(n))
            continue
        try:
            out.add(grp.getgrnam(n).gr_gid)
        except KeyError:
            raise ValueError(f"--admin-group {n!r}: no such group") from None
    return frozenset(out)


@dataclass(frozen=True)
class AdminPolicy:
    """Who may make admin calls."""

    gids: frozenset[int] = frozenset()
    subjects: frozenset[str] = frozenset()
    broker_uid: int = -1

    @classmethod
    def from_config(cls, groups: Iterable[str], subjects: Iterable[str]) -> AdminPolicy:
        return cls(resolve_groups(groups), frozenset(subjects), os.geteuid())

    def unix_admin(self, uid: int, gids: frozenset[int]) -> bool:
        return uid == 0 or uid == self.broker_uid or bool(self.gids & gids)

    def tls_admin(self, subject: str) -> bool:
        return subject in self.subjects


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason


def admin_refusal(caller: Caller, what: str) -> Refused:
    """The status for a caller who may not make an admin call: UNAUTHENTICATED when we do
    not know who it is, PERMISSION_DENIED when we do."""
    if caller.anonymous:
        return Refused(
            grpc.StatusCode.UNAUTHENTICATED,
            f"{what} is an admin call and this caller is anonymous: on a Unix socket present"
            f" a peer-socket ticket in '{TICKET_METADATA}' metadata (pasid_client does),"
            " over TCP a client certificate listed in --admin-subject",
            "ANONYMOUS",
        )
    return Refused(
        grpc.StatusCode.PERMISSION_DENIED,
        f"{what} is an admin call and {caller.identity} is not an admin (uid 0, the"
        " broker's uid, a member of --admin-group, or an --admin-subject certificate)",
        "PERMISSION_DENIED",
    )


class Authorizer(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Identifies the caller of every RPC on one listener and refuses admin calls from
    non-admins. `transport` is "unix", "tls" or "tcp" (plain, loopback)."""

    def __init__(
        self,
        transport: str,
        policy: AdminPolicy,
        take_ticket: TakeTicket | None = None,
    ) -> None:
        if transport not in ("unix", "tls", "tcp"):
            raise ValueError(f"transport {transport!r}")
        self.transport = transport
        self.policy = policy
        self.take_ticket = take_ticket

    def identify(self, context: grpc.aio.ServicerContext[Any, Any], ticket: str) -> Caller:
        """The caller; Refused for a ticket that is not valid (or where none is accepted)."""
        if self.transport == "tls":
            if ticket:
                raise Refused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "a peer ticket proves a local process; over TCP the certificate is the"
                    " identity: send no pasid-ticket",
                    "INVALID_ARGUMENT",
                )
            auth = context.auth_context()
            subject = b"".join(auth.get("x509_subject", [])).decode(errors="replace")
            if not subject:  # require_client_auth makes this unreachable; refuse anyway
                raise Refused(
                    grpc.StatusCode.UNAUTHENTICATED, "no client certificate", "UNAUTHENTICATED"
                )
            return Caller(x509_identity(subject), self.policy.tls_admin(subject), subject=subject)
        if self.transport == "tcp":
            return ANONYMOUS_CALLER
        if not ticket:
            return ANONYMOUS_CALLER
        if self.take_ticket is None:
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                "this broker has no peer socket; it cannot check a pasid-ticket",
                "TICKET",
            )
        try:
            peer = self.take_ticket(ticket)
        except TicketError as exc:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, str(exc), "TICKET") from None
        try:
            # A delegated ticket's process is the delegate, whose groups are not the
            # caller's (a setgid program): it is judged by the delegator's gid alone.
            own = frozenset() if peer.delegated else process_groups(peer.pid, peer.pidfd)
            gids = own | {peer.gid}
            admin = self.policy.unix_admin(peer.uid, gids)
        finally:
            peer.close()  # a per-call identity: nothing outlives the call
        return Caller(uid_identity(peer.uid), admin, uid=peer.uid)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        ticket = ""
        for key, value in details.invocation_metadata or ():
            if key == TICKET_METADATA:
                ticket = value if isinstance(value, str) else value.decode(errors="replace")
        admin_only = method.startswith(ADMIN_SERVICE)
        if not ticket and not admin_only and self.transport != "tls":
            # Anonymous, and nothing to check here: the default caller of every call.
            return handler
        return _wrap(handler, self, ticket, method.rsplit("/", 1)[-1] if admin_only else "")


async def _enter(
    authz: Authorizer, context: grpc.aio.ServicerContext[Any, Any], ticket: str, admin_call: str
) -> Caller:
    try:
        caller = authz.identify(context, ticket)
        if admin_call and not caller.admin:
            raise admin_refusal(caller, admin_call)
    except Refused as r:
        context.set_trailing_metadata((("pasid-reason", r.reason),))
        await context.abort(r.code, r.message)
        raise AssertionError("unreachable") from None  # abort raises
    _current.set(caller)
    return caller


def _wrap(
    handler: grpc.RpcMethodHandler, authz: Authorizer, ticket: str, admin_call: str
) -> grpc.RpcMethodHandler:
    """The same handler, run with the caller identified (and admin calls checked)."""
    inner = behaviour(handler)
    if not handler.response_streaming:

        async def reply(request: Any, context: Any) -> Any:
            await _enter(authz, context, ticket, admin_call)
            return await inner(request, context)

        return rebuild(handler, reply)

    async def replies(request: Any, context: Any) -> AsyncIterator[Any]:
        await _enter(authz, context, ticket, admin_call)
        async with contextlib.aclosing(inner(request, context)) as items:
            async for item in items:
                yield item

    return rebuild(handler, replies)
