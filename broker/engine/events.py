"""The event log's live side: fan-out of committed events, and Watch (replay, then live)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from broker.core import Compacted, NotReady, Unsupported
from broker.store import Event, SqliteStore

WATCH_BACKLOG = 100_000  # events queued for one watcher before it is cut loose


class EventFanout:
    """Committed events, in revision order, to every watcher's queue."""

    def __init__(self, store: SqliteStore, stopping: Callable[[], bool]) -> None:
        self._store = store
        self._stopping = stopping
        self._watchers: set[asyncio.Queue[Event | None]] = set()
        self.revision = 0  # last committed event revision

    def publish(self, events: list[Event]) -> None:
        """Called on the loop after each commit, in revision order."""
        if events:
            self.revision = events[-1].revision
        for q in list(self._watchers):
            if q.qsize() + len(events) > WATCH_BACKLOG:
                # A watcher this far behind is cut loose (it gets told to Watch again from
                # its last revision) rather than letting its backlog grow without bound.
                self._watchers.discard(q)
                q.put_nowait(None)
                continue
            for ev in events:
                q.put_nowait(ev)

    def subscribe(self) -> asyncio.Queue[Event | None]:
        """A queue that receives every event committed from now on."""
        q: asyncio.Queue[Event | None] = asyncio.Queue()
        self._watchers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[Event | None]) -> None:
        self._watchers.discard(q)

    def end_watches(self) -> None:
        """Shutdown: every Watch ends now (UNAVAILABLE, with the revision to resume from)
        instead of holding the drain open until its deadline."""
        for q in self._watchers:
            q.put_nowait(None)
        self._watchers.clear()

    async def watch(self, from_revision: int) -> AsyncIterator[Event]:
        """Events from `from_revision` (0: from now on), replayed then live, each once.

        Subscribing before reading the log closes the gap: an event committed meanwhile is
        in both, and the revision check drops the second copy.
        """
        q = self.subscribe()
        try:
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
                while True:
                    batch = await asyncio.to_thread(self._store.read_events, last, 1000)
                    for ev in batch:
                        yield ev
                        last = ev.revision
                    if len(batch) < 1000:
                        break
            while True:
                live = await q.get()
                if live is None:
                    if self._stopping():
                        raise NotReady(
                            f"broker is shutting down; Watch again from revision {last + 1}"
                        )
                    raise Unsupported(
                        f"watcher fell more than {WATCH_BACKLOG} events behind;"
                        f" Watch again from revision {last + 1}"
                    )
                if live.revision > last:
                    yield live
                    last = live.revision
        finally:
            self.unsubscribe(q)
