"""What a session does when its stream breaks: the rules both clients (aio.py, sync.py) share.

A session's stream breaks when the broker goes away (a crash, a SIGTERM restart, a reset
connection). The set does not: the broker keeps it (a verified holder's until it exits,
others for their grace), and the session resumes it with its token, re-proving who holds
it with a fresh peer handshake, as etcd's lease keep-alive and ZooKeeper's session
reconnect do for their users. The application sees this only through `on_state_change`
and `session.state`; the library gives up after `reconnect_deadline_seconds`.
"""

from __future__ import annotations

import enum
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from pasid.v1 import broker_pb2 as pb

from pasid_client.errors import (
    FailedPrecondition,
    PasidClientError,
    PermissionDenied,
    QuotaExceeded,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger("pasid_client")

T = TypeVar("T")

# The default bound on reconnecting (and on an open waiting for a starting broker): a
# broker restart with 1 M PASIDs serves within 2 s; 60 s also covers a slow service
# manager or a DaemonSet's rolling update.
RECONNECT_DEADLINE_SECONDS = 60.0


class SessionState(enum.StrEnum):
    """Where a session is. CONNECTED and RESUMED serve requests at once; RECONNECTING
    holds them until the resume (bounded by the deadline); LOST and CLOSED are final."""

    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    RESUMED = "resumed"  # connected again, after at least one reconnect
    LOST = "lost"
    CLOSED = "closed"


@dataclass(frozen=True)
class StateChange:
    """What `on_state_change` receives.

    `error`: why the stream broke (RECONNECTING), or why the session is LOST. `attempts`:
    open attempts so far in this reconnect. On RESUMED, `reclaimed` are PASIDs the broker
    had lost and took back for this set on the client's word (the witness), `conflicts`
    PASIDs the client held that the broker now gives to another set: they are no longer
    this session's, and the device using them must stop (logged as a warning too).
    `refreed` are PASIDs this session had freed (acknowledged) that the broker had lost
    the free of and still gave to the set: freed again on its complete witness (nothing
    to do for the application: it freed them already). `witness_complete`: whether the
    broker took the witness as everything the session holds (only then is anything
    refreed; a session with an outcome it never heard states a partial one).
    `releasing`: the session is being closed, and this reconnect carries its release (the
    broker was restarting or draining when it was closed).

    `contested` (on RESUMED, and with `notice` "pasid_contested"): PASIDs of this set
    that another set's client claims as its own (a conflict after the broker lost
    state). The session keeps them (its device may still use them) and the broker
    withholds them once this set lets go: an operator settles it (docs/runbook.md).

    `notice`: set when the broker told the session something unprompted; `state` is
    then the session's state, unchanged. "pasid_contested": as above, claimed by set
    `other_set_id`. "pasid_conflict_resolved": `handed_over` PASIDs went from set
    `other_set_id` to this one (`received`: this session's claim won, it holds them
    again), or from this set to it (its client had let go of them)."""

    state: SessionState
    set_id: int
    error: PasidClientError | None = None
    attempts: int = 0
    reclaimed: tuple[tuple[int, int], ...] = ()
    conflicts: tuple[tuple[int, int], ...] = ()
    refreed: tuple[tuple[int, int], ...] = ()
    witness_complete: bool = False
    releasing: bool = False
    contested: tuple[tuple[int, int], ...] = ()
    notice: str = ""
    other_set_id: int = 0
    handed_over: tuple[tuple[int, int], ...] = ()
    received: bool = False


StateCallback = Callable[[StateChange], object]


def notify(callback: StateCallback | None, change: StateChange) -> None:
    """Tell the application; its callback's failure is logged, never raised into the
    library's reconnect loop."""
    if callback is None:
        return
    try:
        callback(change)
    except Exception:
        log.exception("on_state_change callback failed (%s)", change.state.value)


class Backoff:
    """Exponential backoff with jitter ("equal jitter": half fixed, half random), so that
    the holders of a restarted broker do not all knock at the same instant."""

    def __init__(
        self, first: float = 0.05, cap: float = 2.0, rng: random.Random | None = None
    ) -> None:
        self.first = first
        self.cap = cap
        self._n = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        d: float = min(self.cap, self.first * 2.0**self._n)
        self._n += 1
        return d / 2 + self._rng.uniform(0, d / 2)


def stream_end_resumable(err: PasidClientError) -> bool:
    """Whether a stream that ended with `err` is worth resuming. ABORTED is the broker
    taking the set (revoked, its holder exited): final. A broken connection, a shutting
    down broker or an unexplained end may have left the set waiting: the resume tells
    (NOT_FOUND when it is gone)."""
    return err.code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.OK,
    )


def open_retryable(err: PasidClientError, *, resuming: bool, own_ticket: bool) -> bool:
    """Whether an open (first, or a reconnect's resume) that failed with `err` may be
    tried again: the broker is not there or not ready yet, or (resuming) the open rate
    limit says "later".
    `resuming`: our own reconnect (its old stream may still look attached to the broker
    for a moment); `own_ticket`: the library made the handshake, so a ticket that the
    broker does not know (issued by the broker that has just died) is made again.
    A socket that refuses us by permission (SOCKET_ACCESS) is final: it says so at once
    instead of after the deadline; a socket not there yet (a starting broker) is waited for."""
    if isinstance(err, PermissionDenied):
        return False
    if isinstance(err, Unavailable) or err.code in (
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    ):
        return True
    if isinstance(err, QuotaExceeded) and err.quota == "session_opens_per_second":
        return resuming  # a restart's holders all resume at once; a first open is told
    if isinstance(err, Unauthenticated) and err.reason == "TICKET":
        return own_ticket
    return resuming and isinstance(err, FailedPrecondition) and err.reason == "CONFLICT"


def when_ready(
    call: Callable[[], T],
    deadline_seconds: float,
    *,
    waiting: Callable[[PasidClientError], object] | None = None,
    sleep: Callable[[float], object] = time.sleep,
) -> T:
    """`call()`, tried again with backoff while it fails as a first open may be retried
    (open_retryable: no socket yet, a broker starting or recovering, a restart under it),
    within `deadline_seconds` (0: one try). The wait a session's open does (gRPC
    wait-for-ready), for what starts with a unary call instead: pasidctl's watch and top,
    and their waits for a restarted broker. `waiting` hears the first failure waited out
    (said once). Raises the last error at the deadline; any other error (SOCKET_ACCESS, a
    bad argument, a compacted revision) at once."""
    deadline = time.monotonic() + deadline_seconds
    backoff = Backoff()
    told = False
    while True:
        try:
            return call()
        except PasidClientError as exc:
            if (
                not open_retryable(exc, resuming=False, own_ticket=True)
                or time.monotonic() >= deadline
            ):
                raise
            if waiting is not None and not told:
                told = True
                waiting(exc)
        sleep(min(backoff.next(), max(deadline - time.monotonic(), 0)))


class HeldPasids:
    """The PASIDs a session holds as it last heard from the broker: each acknowledged
    alloc adds, each acknowledged free removes. Sent as the witness on every resume.

    `epoch` is the set's witness epoch while this is known to be the whole set: learnt
    with a new set (empty) or with a listing of the whole set taken while no change of
    ours was in flight, and kept by every answered request since. 0 while in doubt (an
    outcome never heard, a set taken back by hand, a listing that may include a change
    still in flight): the witness is then partial, and the broker frees nothing on it."""

    def __init__(self) -> None:
        self._held: set[int] = set()
        self.epoch = 0

    def doubt(self) -> None:
        """Something may have changed the set that we did not hear of."""
        self.epoch = 0

    def learn(self, ranges: Iterable[tuple[int, int]], epoch: int) -> None:
        """The whole set, from a listing with nothing of ours in flight, and its epoch."""
        self.replace(ranges)
        self.epoch = epoch

    def add(self, pasids: Iterable[int]) -> None:
        self._held.update(pasids)

    def free(self, lo: int, hi: int) -> None:
        """The broker freed every PASID of ours in [lo, hi]."""
        if hi - lo + 1 >= len(self._held):
            self._held = {p for p in self._held if not lo <= p <= hi}
        else:
            self._held.difference_update(range(lo, hi + 1))

    def replace(self, ranges: Iterable[tuple[int, int]]) -> None:
        self._held = {p for lo, hi in ranges for p in range(lo, hi + 1)}

    def drop(self, ranges: Iterable[tuple[int, int]]) -> None:
        for lo, hi in ranges:
            self.free(lo, hi)

    def __len__(self) -> int:
        return len(self._held)

    def ranges(self) -> list[tuple[int, int]]:
        """Inclusive runs, ascending, as listings show them."""
        return runs_of(self._held)

    def witness(self, req: pb.OpenSession) -> pb.OpenSession:
        """`req` stating what we hold (OpenSession.held, witness): complete, with its
        epoch, when we know it is everything (an older broker ignores that)."""
        req.held.extend(pb.PasidRange(min=lo, max=hi) for lo, hi in self.ranges())
        req.witness = True
        if self.epoch:
            req.witness_complete = True
            req.witness_epoch = self.epoch
        return req


def runs_of(pasids: Iterable[int]) -> list[tuple[int, int]]:
    """Inclusive runs, ascending, as listings show them."""
    out: list[tuple[int, int]] = []
    for p in sorted(pasids):
        if out and out[-1][1] == p - 1:
            out[-1] = (out[-1][0], p)
        else:
            out.append((p, p))
    return out


def ranges_of(m: Iterable[pb.PasidRange]) -> tuple[tuple[int, int], ...]:
    return tuple((r.min, r.max) for r in m)
