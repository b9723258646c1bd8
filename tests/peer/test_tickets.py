"""TicketBook: one use, short life, fds closed when a ticket dies unused."""

from __future__ import annotations

import os

import pytest

from broker.peer import tickets
from broker.peer.tickets import PeerIdentity, TicketBook, TicketError, TooManyTickets


class Clock:
    """A hand-moved clock: expiry is decided by this, not by sleeping."""

    now = 1000.0

    def __call__(self) -> float:
        return self.now


def ident(uid: int = 0) -> PeerIdentity:
    return PeerIdentity(
        pid=1, uid=uid, gid=0, ns_pid=1, start_time=1, pidfd=os.eventfd(0)
    )  # an eventfd stands in for the pidfd: the book only owns and closes it


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_expired_ticket_is_refused_and_its_fd_closed() -> None:
    clock = Clock()
    book = TicketBook(30, clock)
    i = ident()
    t = book.issue(i)
    clock.now += 30
    with pytest.raises(TicketError, match=r"expired \(valid 30 s\)"):
        book.take(t)
    assert not fd_open(i.pidfd)


def test_taken_ticket_hands_over_its_fd() -> None:
    book = TicketBook(30, Clock())
    i = ident()
    t = book.issue(i)
    assert book.take(t) is i and fd_open(i.pidfd)
    with pytest.raises(TicketError, match="already used"):
        book.take(t)
    book.close()
    assert fd_open(i.pidfd)  # the taker owns it now
    i.close()


def test_tickets_are_stored_by_hash_only() -> None:
    book = TicketBook(30, Clock())
    t = book.issue(ident())
    assert t not in repr(vars(book))
    book.close()


def test_outstanding_tickets_per_uid_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tickets, "MAX_PER_UID", 2)
    book = TicketBook(30, Clock())
    book.issue(ident(7))
    book.issue(ident(7))
    extra = ident(7)
    with pytest.raises(TooManyTickets, match="at most 2 per uid"):
        book.issue(extra)
    extra.close()
    book.issue(ident(8))  # another uid is not starved
    book.close()
