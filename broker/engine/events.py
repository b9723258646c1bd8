"""The event log's live side: fan-out of committed events, and Watch (replay, then live).

Fan-out costs the publisher O(1) per event, whatever the number of watchers: committed
events are appended to one shared in-memory log (the last `buffer` of them), and every
watcher keeps its own cursor into it. A publish resolves one future shared by the
watchers of every set and one per set it touched, shared by that set's watchers (a
tenant's Watch sees only its own set), so a thousand tenants watching their own sets
are not woken by each other's events. A
watcher's backlog is the log itself, so a slow watcher costs no memory of its own: when
it falls more than `buffer` events behind it is cut off (LimitExceeded, naming the
revision to Watch again from) and the others never wait for it.

Fan-out never delays the request path (issue 20, point 6): sending is the cost (a
message per event per watcher, on the event loop), and 512 watchers woken by one commit
put 512 sends ahead of every request that arrived meanwhile. So watchers send through a
FanoutGate: at most FANOUT_SLOTS of them send at once, each at most FANOUT_BATCH events
per turn before it queues again, and while more wait, sending takes at most
FANOUT_SHARE of the time; the watchers lag instead (a lagging watcher costs nothing but
its cursor, and is cut off past the buffer). A slot is a lease: a watcher whose client
stopped reading (its send blocked on flow control) loses its slot after FANOUT_LEASE
seconds, so it cannot stall the others' fan-out.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import time
from collections.abc import AsyncIterator, Callable

from broker.core import Compacted, LimitExceeded, NotReady
from broker.store import Event, SqliteStore

WATCH_BUFFER = 10_000  # committed events kept in memory for live watchers (the default)
_REPLAY_BATCH = 1000
FANOUT_SLOTS = 4  # watchers sending at once
FANOUT_BATCH = 32  # events one watcher sends per turn
FANOUT_LEASE = 1.0  # seconds a watcher may hold a slot (a blocked send loses it)
FANOUT_SHARE = 0.25  # of the time, at most, some watcher is sending
FANOUT_BURST = 0.02  # seconds of sending saved up while idle


class _Lease:
    __slots__ = ("active", "timer")

    def __init__(self) -> None:
        self.active = True
        self.timer: asyncio.TimerHandle | None = None


class FanoutGate:
    """At most `slots` watchers sending at once, served in arrival order; while more
    want to send, sending takes at most `share` of the time (a token bucket of seconds,
    `burst` saved up): up to `slots` watchers never wait, 512 watchers of a churning set
    lag instead of taking the event loop from the requests. Each slot is a lease that
    expires after `lease` seconds if not given back."""

    def __init__(
        self,
        slots: int = FANOUT_SLOTS,
        lease: float = FANOUT_LEASE,
        share: float = FANOUT_SHARE,
        burst: float = FANOUT_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._free = slots
        self._slots = slots
        self._lease = lease
        self._share = share
        self._burst = burst
        self._clock = clock
        self._tokens = burst
        self._stamp = clock()
        self._waiters: collections.deque[asyncio.Future[_Lease]] = collections.deque()

    def _account(self) -> float:
        """Refill for the time passed, less that time if someone was sending; the
        tokens (seconds of sending) left, negative when over the share."""
        now = self._clock()
        passed, self._stamp = now - self._stamp, now
        # Only contended time counts: up to `slots` watchers send freely (a lone watcher
        # of a busy set keeps up); beyond them, sending is held to the share.
        busy = passed if self._free < self._slots and self._waiters else 0.0
        self._tokens = min(self._burst, self._tokens + passed * self._share - busy)
        return self._tokens

    async def acquire(self) -> _Lease:
        # Over the share: wait until it is paid back (a budget of time, not an event).
        while (debt := -self._account()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(debt / self._share)
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return self._grant()
        fut: asyncio.Future[_Lease] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(fut.result())  # granted as we were cancelled: pass it on
            raise

    def _grant(self) -> _Lease:
        lease = _Lease()
        lease.timer = asyncio.get_running_loop().call_later(self._lease, self.release, lease)
        return lease

    def release(self, lease: _Lease) -> None:
        if not lease.active:
            return  # expired, then given back: already passed on
        lease.active = False
        if lease.timer is not None:
            lease.timer.cancel()
        self._account()
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(self._grant())
                return
        self._free += 1


class EventFanout:
    """Committed events, in revision order, in one shared log that watchers read."""

    def __init__(self, store: SqliteStore, buffer: int = WATCH_BUFFER) -> None:
        self._store = store
        self.buffer = max(buffer, 1)
        # The shared log: _log[i] is the event at absolute position _dropped + i.
        # Trimmed in halves, so each event costs O(1) amortized to append and to drop.
        self._log: list[Event] = []
        self._dropped = 0
        self._wake: asyncio.Future[None] | None = None  # watchers of every set
        self._wake_set: dict[int, asyncio.Future[None]] = {}  # set_id -> its watchers
        self._ended = False
        self.revision = 0  # last committed event revision
        self._gate = FanoutGate()

    def publish(self, events: list[Event]) -> None:
        """Called on the loop after each commit, in revision order."""
        if not events:
            return
        self.revision = events[-1].revision
        self._log.extend(events)
        if len(self._log) >= 2 * self.buffer:
            cut = len(self._log) - self.buffer
            del self._log[:cut]
            self._dropped += cut
        _wake(self._wake)
        self._wake = None
        if self._wake_set:
            for ev in events:
                _wake(self._wake_set.pop(ev.set_id, None))

    def _wake_all(self) -> None:
        _wake(self._wake)
        self._wake = None
        for fut in self._wake_set.values():
            _wake(fut)
        self._wake_set.clear()

    async def _published(self, set_id: int | None) -> None:
        """Until the next publish (of `set_id`'s events, if given), or the end; one
        future shared by the watchers that wait for the same thing."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] | None
        if set_id is None:
            fut = self._wake
            if fut is None:
                fut = self._wake = loop.create_future()
        else:
            fut = self._wake_set.get(set_id)
            if fut is None:
                fut = self._wake_set[set_id] = loop.create_future()
        # shield: a cancelled watcher must not cancel the future the others wait on.
        await asyncio.shield(fut)

    def end_watches(self) -> None:
        """Shutdown: every Watch ends now (UNAVAILABLE, with the revision to resume from)
        instead of holding the drain open until its deadline."""
        self._ended = True
        self._wake_all()

    def _position_after(self, revision: int) -> int:
        """Absolute position of the first retained event with a revision > `revision`."""
        i = bisect.bisect_right(self._log, revision, key=lambda e: e.revision)
        return self._dropped + i

    def _oldest_in_memory(self) -> int:
        return self._log[0].revision if self._log else self.revision + 1

    async def watch(self, from_revision: int, set_id: int | None = None) -> AsyncIterator[Event]:
        """Events from `from_revision` (0: from now on), replayed then live, each once;
        only set `set_id`'s when given. `from_revision` <= 2^63-1."""

        def visible(ev: Event) -> bool:
            return set_id is None or ev.set_id == set_id

        last = self.revision if from_revision == 0 else from_revision - 1
        if from_revision:
            oldest = await asyncio.to_thread(self._store.oldest_revision)
            if oldest == 0:
                oldest = self.revision + 1  # empty log: everything before is gone
            if from_revision < oldest and from_revision <= self.revision:
                raise Compacted(
                    oldest,
                    f"revision {from_revision} is compacted; the oldest"
                    f" in the event log is {oldest}",
                )
            # Replay from the store until the in-memory log takes over without a gap.
            while last < self._oldest_in_memory() - 1:
                batch = await asyncio.to_thread(self._store.read_events, last, _REPLAY_BATCH)
                for ev in batch:
                    if visible(ev):
                        yield ev
                    last = ev.revision
                if len(batch) < _REPLAY_BATCH:
                    break
        pos = self._position_after(last)
        while True:
            while pos < self._dropped + len(self._log):
                lease = await self._gate.acquire()  # a turn to send (module doc)
                try:
                    sent = 0
                    while sent < FANOUT_BATCH and pos < self._dropped + len(self._log):
                        if pos < self._dropped:
                            raise self._cut_off(last)
                        ev = self._log[pos - self._dropped]
                        pos += 1
                        if ev.revision <= last:
                            continue
                        last = ev.revision
                        if visible(ev):
                            sent += 1
                            yield ev  # the log may be trimmed meanwhile: checked above
                finally:
                    self._gate.release(lease)
            if pos < self._dropped:
                raise self._cut_off(last)
            if self._ended:
                raise NotReady(f"broker is shutting down; Watch again from revision {last + 1}")
            await self._published(set_id)

    def _cut_off(self, last: int) -> LimitExceeded:
        return LimitExceeded(
            "watch_buffer",
            self.buffer,
            f"watcher fell more than {self.buffer} events behind (--watch-buffer);"
            f" Watch again from revision {last + 1}",
        )


def _wake(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)
