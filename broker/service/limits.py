"""What one client may make the broker hold, and who "one client" is.

Every limit is a flag (broker/config.py; the table is docs/limits.md). Crossing one is
LimitExceeded (RESOURCE_EXHAUSTED naming the limit and its value) for that caller only:
everyone else is still served. No grpc here: the servicer hands in identity keys.

Identity: per-identity limits count under an identity key, a string: the kernel-verified
uid of the peer handshake's ticket ("uid:N"), or the one shared ANONYMOUS for callers
without one (docs/peer-identity.md). Sets recovered at a restart count against their stored
holder's uid, or ANONYMOUS.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from broker.core import ANONYMOUS, LimitExceeded
from broker.core.rate import TokenBucket
from broker.engine.observers import Observer


@dataclass(frozen=True)
class Limits:
    """The limits' values; 0 switches a count limit off (not recommended)."""

    # Live sessions (attached, or detached in their grace) one identity may hold: each
    # holds a set, a pidfd and a connection.
    max_sessions_per_identity: int = 1024
    # Session opens (new or resumed) one identity may make per second (token bucket),
    # and the burst it may make at once.
    session_opens_per_second: float = 100.0
    session_open_burst: int = 200
    # Requests read from one Session stream and not yet answered: beyond this the broker
    # stops reading that stream (HTTP/2 flow control holds the client back).
    max_inflight_per_stream: int = 1024
    # Bytes of UTF-8 in OpenSession.client (also what listings and logs show).
    max_client_name_bytes: int = 256
    # Watch streams open at once, in all and per identity.
    max_watchers: int = 4096
    max_watchers_per_identity: int = 256
    # ... and of all anonymous callers together: a uid can open anonymous Watches besides
    # its verified ones (grpc does not tell the broker who an anonymous caller is), so
    # this share is smaller; one uid's worst case is the sum of the two.
    max_watchers_anonymous: int = 32
    # PASIDs one Alloc may ask for (count): bounds the loop's work for one request.
    max_pasids_per_request: int = 4096
    # Committed events kept in memory for live watchers; a watcher further behind is cut
    # off (RESOURCE_EXHAUSTED) and told the revision to Watch again from.
    watch_buffer: int = 10_000
    # Largest request message gRPC accepts (bytes); no request needs more than a few
    # hundred.
    max_request_bytes: int = 65_536


class Admission(Observer):
    """Counts what each identity holds (sessions, watchers) and its open rate.

    An engine Observer: a session stops counting when its set's destroy is durable
    (whoever destroyed it), so detached sessions in their grace still count.
    """

    _MAX_BUCKETS = 4096  # idle (full) buckets are dropped beyond this many identities

    def __init__(
        self,
        limits: Limits,
        clock: Callable[[], float] = time.monotonic,
        watchers_changed: Callable[[int], None] | None = None,
    ) -> None:
        self.limits = limits
        self._clock = clock
        # Told the number of open Watch streams when it changes (the metrics' gauge).
        self._watchers_changed = watchers_changed or (lambda n: None)
        self._sessions: Counter[str] = Counter()
        self._owner: dict[int, str] = {}  # set_id -> identity key
        self._buckets: dict[str, TokenBucket] = {}
        self._watchers: Counter[str] = Counter()
        self.watchers = 0

    # -- sessions -------------------------------------------------------------------------

    def admit_open(self, key: str, new_set: bool) -> None:
        """Before a session open (new, or a resume when not `new_set`): the open rate,
        then the session count. A new set's slot is reserved now (opened() keeps it,
        open_failed() gives it back) so that concurrent opens cannot overshoot."""
        lim = self.limits
        if lim.session_opens_per_second > 0:
            now = self._clock()
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= self._MAX_BUCKETS:
                    self._buckets = {k: b for k, b in self._buckets.items() if not b.full(now)}
                bucket = self._buckets[key] = TokenBucket(
                    lim.session_opens_per_second, lim.session_open_burst, now
                )
            if not bucket.take(now):
                raise LimitExceeded(
                    "session_opens_per_second",
                    int(lim.session_opens_per_second),
                    f"identity {key} opens sessions faster than --session-opens-per-second"
                    f" {lim.session_opens_per_second:g} (burst {lim.session_open_burst});"
                    " retry later",
                )
        if not new_set:
            return
        cap = lim.max_sessions_per_identity
        if cap and self._sessions[key] >= cap:
            raise LimitExceeded(
                "max_sessions_per_identity",
                cap,
                f"identity {key} holds {self._sessions[key]} sessions, the limit"
                f" (--max-sessions-per-identity {cap}); end one first",
            )
        self._sessions[key] += 1

    def opened(self, set_id: int, key: str, durable: Awaitable[None] | None = None) -> None:
        """A new set of `key` exists; if its creation's commit fails (`durable` raises),
        the set is undone without a destroy, so its slot is given back here."""
        self._owner[set_id] = key
        if isinstance(durable, asyncio.Future):

            def landed(f: asyncio.Future[None]) -> None:
                if (f.cancelled() or f.exception() is not None) and set_id in self._owner:
                    self._release(self._owner.pop(set_id))

            durable.add_done_callback(landed)

    def restore(self, set_id: int, key: str) -> None:
        """A set recovered at start counts against its stored holder's identity."""
        self._sessions[key] += 1
        self._owner[set_id] = key

    def open_failed(self, key: str) -> None:
        self._release(key)

    def sessions_of(self, key: str) -> int:
        return self._sessions[key]

    def owner_of(self, set_id: int) -> str | None:
        return self._owner.get(set_id)

    def set_destroyed(self, set_id: int, reason: str, kind: str, pasids: int) -> None:
        key = self._owner.pop(set_id, None)
        if key is not None:
            self._release(key)

    def _release(self, key: str) -> None:
        self._sessions[key] -= 1
        if self._sessions[key] <= 0:
            del self._sessions[key]

    # -- watchers -------------------------------------------------------------------------

    @contextlib.contextmanager
    def watching(self, key: str) -> Iterator[None]:
        """One Watch stream of `key` for the duration; refused beyond the limits."""
        lim = self.limits
        if lim.max_watchers and self.watchers >= lim.max_watchers:
            raise LimitExceeded(
                "max_watchers",
                lim.max_watchers,
                f"{self.watchers} Watch streams are open, the limit (--max-watchers"
                f" {lim.max_watchers}); retry later",
            )
        name = "max_watchers_anonymous" if key == ANONYMOUS else "max_watchers_per_identity"
        cap = getattr(lim, name)
        if cap and self._watchers[key] >= cap:
            raise LimitExceeded(
                name,
                cap,
                f"identity {key} has {self._watchers[key]} Watch streams open, the limit"
                f" (--{name.replace('_', '-')} {cap}); close one first",
            )
        self.watchers += 1
        self._watchers[key] += 1
        self._watchers_changed(self.watchers)
        try:
            yield
        finally:
            self.watchers -= 1
            self._watchers_changed(self.watchers)
            self._watchers[key] -= 1
            if self._watchers[key] <= 0:
                del self._watchers[key]
