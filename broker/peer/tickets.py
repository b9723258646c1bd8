"""One-time tickets: what the handshake learned about a peer, until OpenSession uses it.

A ticket is a bearer secret valid once and briefly; the book keeps only its hash, in
memory (a broker restart invalidates every ticket; clients just handshake again). Each
ticket owns the pidfd (and any delegated fds) of its identity until it is taken or
expires; then whoever took it owns them. A ticket whose process has exited (its pidfd
polls readable) is worth nothing and is dropped, so that only live unused tickets count
against a uid's limit; one taken by an open that was refused is given back.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker.peer.credentials import pidfd_alive

TICKET_BYTES = 32
# Each outstanding ticket holds an fd: bound them so a loop of handshakes cannot exhaust
# the broker's descriptors before the tickets expire.
MAX_PER_UID = 1024
MAX_TOTAL = 8192
MAX_SPENT = 65536  # used/expired hashes remembered for a clearer error, then forgotten
# How often expire() (each issue, take, and the peer server's sweep) also polls every
# ticket's pidfd for an exit; at the per-uid limit issue() polls at once anyway.
EXIT_SWEEP_SECONDS = 0.5


class TicketError(Exception):
    """A ticket that is not (or no longer) valid; the message says which case."""


class TooManyTickets(Exception):
    """A uid holds too many unused tickets."""


@dataclass(frozen=True)
class DelegatedFd:
    """An fd a client handed over besides the pidfd (issue 14: "iommufd", "device")."""

    role: str
    fd: int


@dataclass(eq=False)
class PeerIdentity:
    """The holder of a set, as the kernel vouched for it during the handshake.

    `pidfd` is held for the process's life: it becomes readable when the process exits,
    and no other process can ever be mistaken for it.
    """

    pid: int  # broker's pid namespace
    uid: int
    gid: int
    ns_pid: int  # the holder's pid in its own innermost pid namespace
    start_time: int  # /proc/<pid>/stat field 22: with pid, names the process across restarts
    pidfd: int
    delegated_by: tuple[int, int] | None = None  # (pid, uid) of the client that delegated
    fds: tuple[DelegatedFd, ...] = ()
    devices: tuple[dict[str, Any], ...] = ()
    _closed: bool = field(default=False, repr=False)
    # The deadline of the ticket it came with (monotonic), kept for a give-back.
    ticket_deadline: float = field(default=0.0, repr=False)

    @property
    def delegated(self) -> bool:
        return self.delegated_by is not None

    @property
    def closed(self) -> bool:
        return self._closed

    def exited(self) -> bool:
        """Whether the process has exited (its pidfd polls readable); a closed
        identity counts as exited."""
        if self._closed:
            return True
        try:
            # poll(2), not select(2): a broker with many holders has pidfds past
            # FD_SETSIZE (1024), which select refuses (ValueError); taking that for an exit
            # destroyed a live holder's set when its stream broke.
            return not pidfd_alive(self.pidfd)
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        """Close every fd this identity holds (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for fd in (self.pidfd, *(d.fd for d in self.fds)):
            with contextlib.suppress(OSError):
                os.close(fd)


def hash_ticket(ticket: str) -> str:
    return hashlib.sha256(ticket.encode()).hexdigest()


class TicketBook:
    """Tickets issued and not yet used, by hash, each with its deadline."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._live: dict[str, tuple[float, PeerIdentity]] = {}
        self._exits_swept = float("-inf")  # when drop_exited last ran from expire()
        # Recently used or expired hashes, to tell a replay from a typo; pruned by age.
        self._spent: dict[str, tuple[float, str]] = {}

    def __len__(self) -> int:
        return len(self._live)

    def issue(self, identity: PeerIdentity) -> str:
        """A fresh ticket for `identity`; the book owns its fds until taken or expired."""
        self.expire()
        if self._full(identity.uid):
            self.drop_exited()  # a dead process's tickets count for nothing
            if self._full(identity.uid):
                raise TooManyTickets(
                    f"too many unused tickets of live processes (at most {MAX_PER_UID} per"
                    f" uid, {MAX_TOTAL} in all); they expire after {self.ttl:g} s"
                )
        ticket = secrets.token_urlsafe(TICKET_BYTES)
        identity.ticket_deadline = self._clock() + self.ttl
        self._live[hash_ticket(ticket)] = (identity.ticket_deadline, identity)
        return ticket

    def _full(self, uid: int) -> bool:
        return len(self._live) >= MAX_TOTAL or (
            sum(1 for _, i in self._live.values() if i.uid == uid) >= MAX_PER_UID
        )

    def drop_exited(self) -> int:
        """Drop the tickets whose process has exited, closing their fds; how many."""
        dead = [h for h, (_, identity) in self._live.items() if identity.exited()]
        for h in dead:
            _, identity = self._live.pop(h)
            identity.close()
            self._remember(h, "void: its process has exited")
        return len(dead)

    def give_back(self, ticket: str, identity: PeerIdentity) -> bool:
        """A ticket taken by an open that was then refused is usable again, until its
        own deadline, if its process still runs and its fds are all still open. Else
        its fds are closed. Returns whether it was given back."""
        h = hash_ticket(ticket)
        if (
            identity.closed
            or identity.ticket_deadline <= self._clock()
            or h in self._live
            or identity.exited()
        ):
            identity.close()
            return False
        self._spent.pop(h, None)
        self._live[h] = (identity.ticket_deadline, identity)
        return True

    def take(self, ticket: str) -> PeerIdentity:
        """The ticket's identity, once; the caller now owns its fds. Raises TicketError."""
        self.expire()
        h = hash_ticket(ticket)
        entry = self._live.pop(h, None)
        if entry is None:
            spent = self._spent.get(h)
            if spent is not None:
                raise TicketError(f"ticket {spent[1]}; do the handshake again")
            raise TicketError("unknown ticket (a broker restart voids tickets; handshake again)")
        self._remember(h, "already used")
        return entry[1]

    def uid_of(self, ticket: str) -> int | None:
        """The uid a live ticket carries, without using it up (None if none): what
        per-identity limits count under before the ticket is taken (issue 11)."""
        entry = self._live.get(hash_ticket(ticket))
        if entry is None or entry[0] < self._clock():
            return None
        return entry[1].uid

    def _remember(self, h: str, why: str) -> None:
        if len(self._spent) >= MAX_SPENT:
            del self._spent[next(iter(self._spent))]  # the oldest
        self._spent[h] = (self._clock() + self.ttl, why)

    def expire(self) -> int:
        """Drop what is past its deadline, closing its fds; returns how many expired."""
        now = self._clock()
        if now - self._exits_swept >= EXIT_SWEEP_SECONDS:
            self._exits_swept = now
            self.drop_exited()
        due = [h for h, (deadline, _) in self._live.items() if deadline <= now]
        for h in due:
            _, identity = self._live.pop(h)
            identity.close()
            self._remember(h, f"expired (valid {self.ttl:g} s)")
        for h in [h for h, (until, _) in self._spent.items() if until <= now]:
            del self._spent[h]
        return len(due)

    def close(self) -> None:
        for _, identity in self._live.values():
            identity.close()
        self._live.clear()
