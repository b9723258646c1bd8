"""TicketBook: one use, short life, fds closed when a ticket dies unused."""

from __future__ import annotations

import os
import subprocess

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


def process_identity(proc: subprocess.Popen[bytes], uid: int = 7) -> PeerIdentity:
    """An identity whose pidfd is a real process's (it polls readable once it exits)."""
    return PeerIdentity(
        pid=proc.pid, uid=uid, gid=0, ns_pid=proc.pid, start_time=1, pidfd=os.pidfd_open(proc.pid)
    )


def test_tickets_of_an_exited_process_no_longer_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lockout of issue 19: a process made the most tickets its uid may hold and
    exited; each ticket's pidfd says so, and the uid's next handshake is not refused."""
    monkeypatch.setattr(tickets, "MAX_PER_UID", 50)
    book = TicketBook(30, Clock())
    gone = subprocess.Popen(["sleep", "60"])
    dead = [process_identity(gone) for _ in range(50)]
    spent = [book.issue(i) for i in dead]
    live = subprocess.Popen(["sleep", "60"])
    try:
        extra = process_identity(live)
        with pytest.raises(TooManyTickets, match="at most 50 per uid"):
            book.issue(extra)  # while the first process lives, its tickets count
        gone.kill()
        gone.wait()
        t = book.issue(extra)  # now they count for nothing
        assert len(book) == 1 and all(not fd_open(i.pidfd) for i in dead)
        with pytest.raises(TicketError, match="its process has exited"):
            book.take(spent[0])
        assert book.take(t) is extra
        extra.close()
    finally:
        live.kill()
        live.wait()
        book.close()


def test_a_ticket_given_back_is_usable_again_until_its_deadline() -> None:
    clock = Clock()
    book = TicketBook(30, clock)
    proc = subprocess.Popen(["sleep", "60"])
    try:
        i = process_identity(proc)
        t = book.issue(i)
        assert book.take(t) is i
        assert book.give_back(t, i)  # the open that took it was refused
        assert book.take(t) is i and fd_open(i.pidfd)
        clock.now += 30
        assert not book.give_back(t, i)  # past its deadline: closed, not kept
        assert not fd_open(i.pidfd)
        j = process_identity(proc)
        t2 = book.issue(j)
        book.take(t2)
        proc.kill()
        proc.wait()
        assert not book.give_back(t2, j) and not fd_open(j.pidfd)  # its process exited
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        book.close()
