"""The holder process: who it is and whether it still runs.

Who: the identity a peer-handshake ticket carries (the kernel's word: SO_PEERCRED and a
pidfd, never what a client wrote), or none (anonymous, unless --anonymous refuse).
Whether it runs: its pidfd, owned per set and watched on the event loop, polls readable
when the process exits; after a broker restart, the stored pid and start time are
reopened as a pidfd only if that very process still runs (docs/peer-identity.md).

What an exit means for the set (reclaim it) is sessions.py's rule, not this module's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from broker.core import InvalidArgument, Unauthenticated
from broker.peer import credentials
from broker.peer.tickets import PeerIdentity, TicketBook, TicketError
from broker.store import SetRow

ANONYMOUS_POLICIES = ("allow", "refuse")


@dataclass(frozen=True)
class Holder:
    """The kernel-verified process a set belongs to; stored with the set.

    pid is in the broker's pid namespace; pid + start_time name the process across a
    broker restart (a reused pid has another start time)."""

    pid: int
    uid: int
    ns_pid: int
    start_time: int
    delegated_by_pid: int = 0

    @classmethod
    def of(cls, identity: PeerIdentity) -> Holder:
        by = identity.delegated_by[0] if identity.delegated_by is not None else 0
        return cls(identity.pid, identity.uid, identity.ns_pid, identity.start_time, by)

    @classmethod
    def of_row(cls, row: SetRow) -> Holder | None:
        if row.start_time is None or row.uid is None or row.ns_pid is None or row.pid <= 0:
            return None
        return cls(row.pid, row.uid, row.ns_pid, row.start_time, row.delegated_by_pid or 0)


def reopen_holder(h: Holder) -> int | None:
    """After a restart: a pidfd for the stored holder if that very process still runs.

    The pid was the kernel's (SO_PEERCRED / a pidfd), never a client's. The start time is
    compared before and after pidfd_open, and the pidfd must be live at the second look:
    then the pidfd is the process that started at start_time, and no reused pid slips in.
    """
    try:
        if credentials.start_time(h.pid) != h.start_time:
            return None
        fd = os.pidfd_open(h.pid)
    except (OSError, ValueError, OverflowError):  # OverflowError: a pid no int holds
        return None
    try:
        if credentials.start_time(h.pid) == h.start_time and credentials.pidfd_alive(fd):
            return fd
    except (OSError, ValueError):
        pass
    os.close(fd)
    return None


class Holders:
    """Tickets taken at open, and every verified holder's pidfd, watched for its exit."""

    def __init__(self, tickets: TicketBook | None = None, anonymous: str = "allow") -> None:
        if anonymous not in ANONYMOUS_POLICIES:
            raise ValueError(f"anonymous policy {anonymous!r} not in {ANONYMOUS_POLICIES}")
        # Where the peer socket's handshakes leave their tickets (broker/peer); always
        # a book: without a peer socket it stays empty and every ticket is unknown.
        self.tickets: TicketBook = tickets if tickets is not None else TicketBook(30.0)
        self.anonymous = anonymous
        # set_id -> the holder's pidfd (and any fds delegated with it), watched for exit
        self._held: dict[int, PeerIdentity] = {}

    def ticket_uid(self, ticket: str) -> int | None:
        return self.tickets.uid_of(ticket)

    def take_identity(self, ticket: str, peer: str) -> PeerIdentity | None:
        """The identity a ticket carries (now owned by the caller), or None without one.

        Raises Unauthenticated for a ticket unknown, replayed or expired, or for no ticket
        on the Unix socket under --anonymous refuse; InvalidArgument for a ticket over TCP.
        """
        local = peer.startswith("unix") or peer == ""
        if not ticket:
            if local and self.anonymous == "refuse":
                raise Unauthenticated(
                    "this broker refuses anonymous sessions (--anonymous refuse): do the peer"
                    " handshake (pasid_client does it by itself) and present its ticket",
                    "ANONYMOUS",
                )
            return None
        if not local:
            raise InvalidArgument(
                "a ticket proves a local process and is only accepted on the Unix socket"
            )
        try:
            return self.tickets.take(ticket)
        except TicketError as exc:
            raise Unauthenticated(str(exc)) from None

    def give_back(self, ticket: str, identity: PeerIdentity) -> None:
        """An open that took `ticket` was refused: the ticket is usable again (if its
        process runs and its fds are intact; else they are closed)."""
        self.tickets.give_back(ticket, identity)

    def watch(
        self, set_id: int, identity: PeerIdentity, exited: Callable[..., None], *args: Any
    ) -> None:
        """Own the holder's pidfd; `exited(*args)` runs on the loop the moment it polls
        readable (the process exited), even if a connection lingers (an fd inherited by
        a child)."""
        self._held[set_id] = identity
        asyncio.get_running_loop().add_reader(identity.pidfd, exited, *args)

    def exited(self, set_id: int) -> bool:
        """Whether set `set_id`'s watched holder has exited already (its pidfd polls
        readable), before the loop has run the watch's callback."""
        identity = self._held.get(set_id)
        return identity is not None and identity.exited()

    def unwatch(self, set_id: int) -> None:
        identity = self._held.pop(set_id, None)
        if identity is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(identity.pidfd)
            identity.close()

    def close(self) -> None:
        """Stop watching every holder; their pidfds are closed."""
        for set_id in list(self._held):
            self.unwatch(set_id)
