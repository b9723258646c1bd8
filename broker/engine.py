"""The broker: allocator, backend and store composed, and the session lifecycle.

Every state change runs on the event loop thread in three steps: the allocator decides,
the backend agrees, the journal makes it durable. A reply is sent only after its commit
(acknowledged = durable). If a step fails, the earlier ones are undone in reverse, so
memory, backend and disk never disagree.

`Broker.end_session` is the one place where a session's end frees its set.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import Future as ThreadFuture
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from broker.backends.base import Backend, Capabilities, replay
from broker.core import (
    WIRE_PASID_BITS,
    Allocator,
    BackendError,
    Compacted,
    Conflict,
    InvalidArgument,
    IoasidSet,
    NotFound,
    NotReady,
    PasidError,
    Quarantine,
    Quotas,
    StoreError,
    Unsupported,
    runs,
)
from broker.core.ioctl import PasidOp, check_pasid_request
from broker.metrics import Metrics
from broker.store import (
    AddPasids,
    CreateSet,
    DestroySet,
    Event,
    Record,
    RemovePasids,
    SetRow,
    Snapshot,
    SqliteStore,
)

log = logging.getLogger("pasid_broker")

WATCH_BACKLOG = 100_000  # events queued for one watcher before it is cut loose

T = TypeVar("T")


class RecoveryError(Exception):
    """The store cannot be loaded as it is; the broker refuses to start (never repairs)."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(eq=False)
class Session:
    """A client's hold on one ioasid_set. `attached` while a stream carries it."""

    set: IoasidSet
    pid: int
    grace_seconds: int
    token_hash: str
    created_unix: float
    attached: bool = True
    peer: str = ""
    # Set by the stream that holds the session: ends it with the given message when the
    # broker takes the set (revoke, the declared process exited).
    on_revoke: Callable[[str], None] | None = None

    @property
    def session_id(self) -> int:
        return self.set.set_id

    @property
    def client(self) -> str:
        return self.set.client


@dataclass(frozen=True)
class Info:
    backend: str
    pasid_bits: int
    capacity: int
    in_use: int
    reserved: int
    sessions: int
    sets: int
    quotas: Quotas
    revision: int
    # Freed PASIDs not yet back in the pool: in neither in_use nor free.
    quarantined: int = 0


@dataclass
class _Entry:
    record: Record
    undo: Callable[[], None]
    future: asyncio.Future[Any]
    result: Any


class Journal:
    """Group commit: records queued while one batch commits go together in the next.

    At most one batch is in flight, on one writer thread. When a batch fails, it and
    everything queued after it (which may depend on it) are undone newest first and fail
    with the StoreError; nothing of them was acknowledged.
    """

    def __init__(
        self,
        store: SqliteStore,
        on_commit: Callable[[list[Event]], None] | None = None,
        *,
        metrics: Metrics | None = None,
        ack_before_commit: bool = False,
    ) -> None:
        self._store = store
        self._on_commit = on_commit
        # observability: commit latency, and what became durable (broker/metrics.py)
        self._metrics = metrics if metrics is not None else Metrics()
        self._commit = self._metrics.commit_timed(store.commit)
        # A deliberate bug, only for testing the crash test (broker.testfaults).
        self._ack_before_commit = ack_before_commit
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="pasid-store")
        self._pending: list[_Entry] = []
        self._inflight: list[_Entry] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def submit(self, record: Record, undo: Callable[[], None], result: T) -> asyncio.Future[T]:
        fut: asyncio.Future[T] = self._loop.create_future()
        if self._ack_before_commit:
            fut.set_result(result)
        self._pending.append(_Entry(record, undo, fut, result))
        self._idle.clear()
        if self._inflight is None:
            self._kick()
        return fut

    def _kick(self) -> None:
        batch, self._pending = self._pending, []
        self._inflight = batch
        records = [e.record for e in batch]
        cf = self._executor.submit(self._commit, records)
        cf.add_done_callback(lambda f: self._loop.call_soon_threadsafe(self._done, batch, f))

    def _done(self, batch: list[_Entry], f: ThreadFuture[list[Event]]) -> None:
        self._inflight = None
        exc = f.exception()
        records = [e.record for e in batch]
        if exc is None:
            self._metrics.committed(records)
            for e in batch:
                if not e.future.done():
                    e.future.set_result(e.result)
            if self._on_commit is not None:
                self._on_commit(f.result())
        else:
            later, self._pending = self._pending, []
            self._metrics.commit_failed(records + [e.record for e in later])
            err = exc if isinstance(exc, StoreError) else StoreError(f"store commit failed: {exc}")
            log.error(
                "store commit failed; undoing %d changes",
                len(batch) + len(later),
                extra={
                    "error": str(err),
                    "sets": sorted({_set_of(e.record) for e in batch + later}),
                },
            )
            for e in reversed(batch + later):
                try:
                    e.undo()
                except Exception:  # an undo must not stop the others
                    # Not %r: a CreateSet carries the token's hash, which logs never need.
                    log.exception(
                        "undo failed for %s",
                        type(e.record).__name__,
                        extra={"session": _set_of(e.record), "set": _set_of(e.record)},
                    )
                if not e.future.done():
                    e.future.set_exception(StoreError(err.message))
        if self._pending:
            self._kick()
        else:
            self._idle.set()

    async def drain(self) -> None:
        await self._idle.wait()

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def _set_of(rec: Record) -> int:
    return rec.row.set_id if isinstance(rec, CreateSet) else rec.set_id


U = TypeVar("U")


def then(fut: asyncio.Future[T], fn: Callable[[T], U]) -> asyncio.Future[U]:
    """A future of fn(fut's result): errors and cancellation pass through unchanged."""
    out: asyncio.Future[U] = asyncio.get_running_loop().create_future()

    def done(f: asyncio.Future[T]) -> None:
        if f.cancelled():
            out.cancel()
        elif (exc := f.exception()) is not None:
            out.set_exception(exc)
        else:
            out.set_result(fn(f.result()))

    fut.add_done_callback(done)
    return out


def _done_future(value: T) -> asyncio.Future[T]:
    fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    fut.set_result(value)
    return fut


def _pid_alive(pid: int) -> bool:
    """False only when the declared local pid certainly no longer exists."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Broker:
    """The daemon's state and rules, with no knowledge of gRPC."""

    def __init__(
        self,
        backend: Backend,
        store: SqliteStore,
        *,
        quotas: Quotas | None = None,
        reserved: Sequence[tuple[int, int]] = (),
        quarantine: Quarantine | None = None,
        max_grace: int = 300,
        restart_grace: int = 10,
        clock: Callable[[], float] = time.time,
        ack_before_commit: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
        self.backend = backend
        self.store = store
        self.quotas = quotas or Quotas()
        self.reserved_ranges = tuple(reserved)
        self.quarantine = quarantine or Quarantine()
        self.max_grace = max_grace
        self.restart_grace = restart_grace
        self.clock = clock
        self.ack_before_commit = ack_before_commit
        self.caps: Capabilities | None = None
        self._allocator: Allocator | None = None
        self._journal: Journal | None = None
        self._sessions: dict[int, Session] = {}
        self._by_token: dict[str, Session] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._next_set_id = 1
        self._watchers: set[asyncio.Queue[Event | None]] = set()
        self._pidfds: dict[int, int] = {}  # set_id -> pidfd watched for the holder's exit
        self.revision = 0  # last committed event revision
        self.stopping = False
        self.ready = False

    # -- start / stop -------------------------------------------------------------------

    @property
    def allocator(self) -> Allocator:
        if self._allocator is None:
            raise RuntimeError("broker not started")
        return self._allocator

    @property
    def journal(self) -> Journal:
        if self._journal is None:
            raise RuntimeError("broker not started")
        return self._journal

    async def start(self) -> None:
        """Open the backend, load and check the store, replay, and reclaim the departed.

        The heavy part runs in a worker thread so that the loop keeps answering health
        checks (NOT_SERVING) meanwhile; requests get UNAVAILABLE until `ready`.
        """
        t0 = time.perf_counter()
        snap, replayed = await asyncio.to_thread(self._recover)
        self._journal = Journal(
            self.store,
            self._publish,
            metrics=self.metrics,
            ack_before_commit=self.ack_before_commit,
        )
        for sess in list(self._sessions.values()):
            if not _pid_alive(sess.pid):
                self._destroy(sess, "client exited before restart", "set_reclaimed")
            else:
                self._schedule_reclaim(
                    sess, max(self.restart_grace, sess.grace_seconds), "grace expired after restart"
                )
                self._watch_pid(sess)
        self.ready = True
        assert self.caps is not None
        took = time.perf_counter() - t0
        self.metrics.recovered(took, replayed, len(snap.sets))
        log.info(
            "recovered %d sets, %d PASIDs replayed into %s in %.3f s",
            len(snap.sets),
            replayed,
            self.caps.name,
            took,
            extra={"sets": len(snap.sets), "replayed": replayed, "seconds": round(took, 6)},
        )

    def _recover(self) -> tuple[Snapshot, int]:
        """Backend, allocator and sessions from the store; runs before anything else may
        touch them."""
        caps = self.backend.open()
        if caps.pasid_bits > WIRE_PASID_BITS:
            raise Unsupported(
                f"backend {caps.name} reports pasid_bits {caps.pasid_bits} > {WIRE_PASID_BITS},"
                " the most the wire (and the seed's int return) can carry"
            )
        self.caps = caps
        log.info(
            "backend %s open: pasid_bits %d from %s%s",
            caps.name,
            caps.pasid_bits,
            caps.pasid_bits_source,
            f" ({caps.detail})" if caps.detail else "",
        )
        # The quarantine measures time on the monotonic clock: a wall-clock step must not
        # release a PASID early. It lives in memory only (docs/quarantine.md).
        allocator = Allocator(
            caps.pasid_bits,
            reserved=self.reserved_ranges,
            quotas=self.quotas,
            quarantine=self.quarantine,
            clock=time.monotonic,
            report_expired=True,
        )
        snap = self.store.open()
        held: list[int] = []
        for row in snap.sets:
            s = allocator.create_set(row.set_id, row.client, row.quota)
            try:
                allocator.claim(row.set_id, snap.holdings[row.set_id])
            except ValueError as exc:
                raise RecoveryError(
                    f"store {self.store.path}: set {row.set_id} ({row.client}) cannot be"
                    f" restored: {exc}; refusing to start (nothing was changed)"
                ) from exc
            held.extend(s.pasids)
            sess = Session(
                s, row.pid, row.grace_seconds, row.token_hash, row.created_unix, attached=False
            )
            self._sessions[row.set_id] = sess
            self._by_token[row.token_hash] = sess
        # Written only once every stored set is known to fit: a refusal changes nothing.
        if snap.meta.get("pasid_bits") != str(caps.pasid_bits):
            self.store.set_meta("pasid_bits", str(caps.pasid_bits))
        held.sort()
        replayed = replay(self.backend, held)
        self._next_set_id = snap.next_set_id
        self.revision = snap.revision
        self._allocator = allocator
        return snap, replayed

    def require_ready(self) -> None:
        """Requests before recovery has finished (or while stopping) are UNAVAILABLE."""
        if not self.ready:
            raise NotReady("broker is recovering its store; retry shortly")

    async def stop(self) -> None:
        """Keep every set (restored with its grace at the next start) and close cleanly."""
        self.stopping = True
        self.ready = False
        for h in self._timers.values():
            h.cancel()
        self._timers.clear()
        for set_id in list(self._pidfds):
            self._unwatch_pid(set_id)
        self.end_watches()
        if self._journal is not None:
            await self._journal.drain()
            self._journal.close()
        self.store.close()
        self.backend.close()

    # -- events -------------------------------------------------------------------------

    def _publish(self, events: list[Event]) -> None:
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

    # -- sessions -----------------------------------------------------------------------

    async def open_session(
        self,
        client: str,
        pid: int = 0,
        grace_seconds: int = 0,
        resume_token: str = "",
        peer: str = "",
    ) -> tuple[Session, str, bool]:
        """A new session with a new set, or the one `resume_token` names; (session, token,
        resumed). Raises NotFound for an unknown token, Conflict if it is attached, and
        InvalidArgument when a local client declares a pid that does not exist."""
        self.require_ready()
        local = peer.startswith("unix") or peer == ""
        if local and pid > 0 and not _pid_alive(pid):
            raise InvalidArgument(f"declared pid {pid} does not exist on this host")
        if resume_token:
            sess = self._by_token.get(hash_token(resume_token))
            if sess is None:
                raise NotFound(
                    "resume token matches no session (expired, reclaimed or never issued)"
                )
            if sess.attached:
                raise Conflict(f"session {sess.session_id} is attached to another stream")
            timer = self._timers.pop(sess.session_id, None)
            if timer is not None:
                timer.cancel()
            sess.attached = True
            sess.peer = peer
            self.metrics.session_opened(resumed=True)
            log.info(
                "session resumed",
                extra={"session": sess.session_id, "set": sess.session_id, "held": len(sess.set)},
            )
            return sess, resume_token, True

        grace = min(max(grace_seconds, 0), self.max_grace)
        set_id = self._next_set_id
        self._next_set_id += 1
        token = secrets.token_urlsafe(24)
        th = hash_token(token)
        now = self.clock()
        s = self.allocator.create_set(set_id, client)
        sess = Session(s, pid, grace, th, now, peer=peer)
        self._sessions[set_id] = sess
        self._by_token[th] = sess

        def undo() -> None:
            self.allocator.destroy_set(set_id)
            self._forget(sess)

        row = SetRow(set_id, client, pid, s.quota, grace, th, now)
        await self.journal.submit(CreateSet(row), undo, None)
        self.metrics.session_opened(resumed=False)
        if local:
            self._watch_pid(sess)
        log.info(
            "session opened",
            extra={
                "session": set_id,
                "set": set_id,
                "client": client,
                "pid": pid,
                "grace": grace,
                "peer": peer,
            },
        )
        return sess, token, False

    # -- the holder's process -------------------------------------------------------------

    def _watch_pid(self, sess: Session) -> None:
        """Reclaim the set when its declared local process exits, even if a connection
        lingers (e.g. held by a helper). pidfd: no polling, no pid-reuse race."""
        if sess.pid <= 0 or sess.session_id in self._pidfds:
            return
        try:
            fd = os.pidfd_open(sess.pid)
        except (OSError, AttributeError):
            return  # gone already (recovery handles it), or no pidfd: the stream still tells
        self._pidfds[sess.session_id] = fd
        asyncio.get_running_loop().add_reader(fd, self._pid_exited, sess)

    def _unwatch_pid(self, set_id: int) -> None:
        fd = self._pidfds.pop(set_id, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def _pid_exited(self, sess: Session) -> None:
        self._unwatch_pid(sess.session_id)
        if self._sessions.get(sess.session_id) is sess and not self.stopping:
            self.reclaim(sess, f"client process {sess.pid} exited")

    def reclaim(self, sess: Session, reason: str) -> asyncio.Future[None]:
        """The broker takes a set now, whatever its grace: its stream, if any, ends."""
        was_attached = sess.attached
        sess.attached = False
        timer = self._timers.pop(sess.session_id, None)
        if timer is not None:
            timer.cancel()
        if was_attached and sess.on_revoke is not None:
            sess.on_revoke(f"set {sess.session_id} reclaimed: {reason}")
        return self._destroy(sess, reason, "set_reclaimed")

    async def revoke(self, set_id: int, reason: str) -> int:
        """Admin: destroy a set now; returns how many PASIDs it held."""
        sess = self._sessions.get(set_id)
        if sess is None:
            raise NotFound(f"no set {set_id}")
        held = len(sess.set)
        await self.reclaim(sess, f"revoked: {reason or 'by admin'}")
        return held

    def set_quotas(self, set_id: int, per_set: int, per_client: int, global_: int) -> None:
        """Admin: change quotas until the next restart (flags rule at start)."""
        if set_id:
            sess = self._sessions.get(set_id)
            if sess is None:
                raise NotFound(f"no set {set_id}")
            sess.set.quota = per_set
            log.info("set quota changed", extra={"set": set_id, "quota": per_set})
            return
        self.quotas = Quotas(per_set, per_client, global_)
        self.allocator.quotas = self.quotas
        log.info(
            "quotas changed",
            extra={"per_set": per_set, "per_client": per_client, "global": global_},
        )

    def authenticate(self, session_id: int, token: str) -> Session:
        """The live session that (session_id, token) names; NotFound otherwise."""
        self.require_ready()
        sess = self._sessions.get(session_id)
        if sess is None or not secrets.compare_digest(sess.token_hash, hash_token(token)):
            raise NotFound(f"no session {session_id} with that token")
        return sess

    def end_session(self, sess: Session, reason: str) -> None:
        """A session's stream is over: destroy its set now, or after its grace.

        The one place where set-destroy-on-exit happens. While the broker is stopping, sets
        are kept: a broker restart is not the client's exit.
        """
        if not sess.attached:
            return
        sess.attached = False
        if self.stopping:
            return
        if sess.grace_seconds > 0:
            log.info(
                "session detached",
                extra={
                    "session": sess.session_id,
                    "set": sess.session_id,
                    "reason": reason,
                    "grace": sess.grace_seconds,
                },
            )
            self._schedule_reclaim(sess, sess.grace_seconds, "grace expired")
        else:
            self._destroy(sess, reason)

    def _schedule_reclaim(self, sess: Session, delay: float, reason: str) -> None:
        loop = asyncio.get_running_loop()
        old = self._timers.pop(sess.session_id, None)
        if old is not None:
            old.cancel()
        self._timers[sess.session_id] = loop.call_later(delay, self._reclaim, sess, reason)

    def _reclaim(self, sess: Session, reason: str) -> None:
        self._timers.pop(sess.session_id, None)
        if not sess.attached and self._sessions.get(sess.session_id) is sess:
            self._destroy(sess, reason, "set_reclaimed")

    def _destroy(
        self, sess: Session, reason: str, kind: str = "set_destroyed"
    ) -> asyncio.Future[None]:
        """Free the whole set: allocator, then backend, then store.

        kind "set_destroyed": its client ended it; "set_reclaimed": the broker took it.
        """
        set_id = sess.session_id
        client = sess.client
        quota = sess.set.quota
        freed = self.allocator.destroy_set(set_id)
        self._forget(sess)
        self._unwatch_pid(set_id)
        self._backend_release(freed)

        def undo() -> None:
            s = self.allocator.create_set(set_id, client, quota)
            self._backend_alloc_exact(self.allocator.claim(set_id, freed))
            sess.set = s
            self._sessions[set_id] = sess
            self._by_token[sess.token_hash] = sess
            self._schedule_reclaim(sess, 1.0, reason)  # retry: the store may recover

        log.info(
            "set destroyed" if kind == "set_destroyed" else "set reclaimed",
            extra={
                "session": set_id,
                "set": set_id,
                "client": client,
                "freed": len(freed),
                "reason": reason,
            },
        )
        fut = self.journal.submit(DestroySet(set_id, reason, kind), undo, None)

        def count(f: asyncio.Future[None]) -> None:
            if not f.cancelled() and f.exception() is None:
                self.metrics.set_reclaimed(reason, len(freed))

        fut.add_done_callback(count)
        return fut

    def _forget(self, sess: Session) -> None:
        self._sessions.pop(sess.session_id, None)
        self._by_token.pop(sess.token_hash, None)

    # -- requests -----------------------------------------------------------------------

    def alloc(self, sess: Session, lo: int, hi: int, count: int = 1) -> asyncio.Future[list[int]]:
        """Allocate and queue the commit; the future resolves once durable. Checks raise."""
        set_id = sess.session_id
        try:
            self._require_attached(sess)
            got = self.allocator.alloc(set_id, lo, hi, count)
            # Quarantine over: the backend may let go of them now (before it is asked for
            # `got`, which may include some of them).
            self._backend_free(self.allocator.take_expired())
            try:
                self._backend_alloc_exact(got)
            except BaseException:
                self.allocator.release(set_id, got)
                raise
        except PasidError as exc:
            self.metrics.alloc_refused(exc)  # success is counted when the commit lands
            raise

        def undo() -> None:
            self._backend_free(got)
            self.allocator.release(set_id, got)

        return self.journal.submit(AddPasids(set_id, tuple(got)), undo, got)

    def free(self, sess: Session, lo: int, hi: int) -> asyncio.Future[int]:
        """Free the session's PASIDs in [lo, hi]; resolves to the count once durable."""
        set_id = sess.session_id
        try:
            self._require_attached(sess)
            freed = self.allocator.free_range(set_id, lo, hi)
        except PasidError as exc:
            self.metrics.free_refused(exc)
            raise
        if not freed:
            self.metrics.free_nothing()
            return _done_future(0)
        try:
            held_back = self._backend_release(freed, exact=True)
        except BaseException:
            self.allocator.claim(set_id, freed)
            raise

        def undo() -> None:
            if held_back:  # the backend still holds what is still quarantined
                self._backend_alloc_exact(self.allocator.claim(set_id, freed))
            else:
                self._backend_alloc_exact(freed)
                self.allocator.claim(set_id, freed)

        return self.journal.submit(RemovePasids(set_id, tuple(freed)), undo, len(freed))

    def pasid_request(
        self, sess: Session, argsz: int, flags: int, lo: int, hi: int
    ) -> asyncio.Future[int]:
        """VFIO_IOMMU_PASID_REQUEST semantics: the PASID for ALLOC, 0 for FREE."""
        op = check_pasid_request(argsz, flags, lo, hi, self.allocator.pasid_bits)
        if op is PasidOp.ALLOC:
            return then(self.alloc(sess, lo, hi, 1), lambda got: got[0])
        return then(self.free(sess, lo, hi), lambda _freed: 0)

    async def watch(self, from_revision: int) -> AsyncIterator[Event]:
        """Events from `from_revision` (0: from now on), replayed then live, each once.

        Subscribing before reading the log closes the gap: an event committed meanwhile is
        in both, and the revision check drops the second copy.
        """
        q = self.subscribe()
        try:
            last = self.revision if from_revision == 0 else from_revision - 1
            if from_revision:
                oldest = await asyncio.to_thread(self.store.oldest_revision)
                if oldest == 0:
                    oldest = self.revision + 1  # empty log: everything before is gone
                if from_revision < oldest and from_revision <= self.revision:
                    raise Compacted(
                        oldest,
                        f"revision {from_revision} is compacted; the oldest"
                        f" in the event log is {oldest}",
                    )
                while True:
                    batch = await asyncio.to_thread(self.store.read_events, last, 1000)
                    for ev in batch:
                        yield ev
                        last = ev.revision
                    if len(batch) < 1000:
                        break
            while True:
                live = await q.get()
                if live is None:
                    if self.stopping:
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

    def _require_attached(self, sess: Session) -> None:
        if self._sessions.get(sess.session_id) is not sess:
            raise NotFound(f"session {sess.session_id} has ended")
        if self.stopping:
            raise NotReady("broker is shutting down; resume the session once it is back")

    def _backend_alloc_exact(self, pasids: Iterable[int]) -> None:
        """Make the backend hold exactly these PASIDs, all or none."""
        done: list[int] = []
        try:
            for p in pasids:
                got = self.backend.alloc(p, p)
                if got != p:
                    done.append(got)
                    raise BackendError(
                        5, f"backend {self.backend.name} returned {got} for [{p}, {p}]"
                    )
                done.append(p)
        except PasidError:
            self._backend_free(done)
            raise

    def _backend_free_exact(self, pasids: Sequence[int]) -> None:
        """Make the backend release exactly these PASIDs, all or none (a client's free).

        Unlike _backend_free, a failure is the request's: the runs already released are
        taken back and the error raised, so the client's set is as it was (a PASID the
        backend kept must not look free, or the next alloc would be refused for it).
        """
        done: list[int] = []
        for lo, hi in runs(pasids):
            try:
                self.backend.free(lo, hi)
            except PasidError:
                self._backend_alloc_exact(done)
                raise
            done.extend(range(lo, hi + 1))

    def _backend_release(self, freed: list[int], *, exact: bool = False) -> bool:
        """A set gave these up: free them in the backend, unless they went to quarantine.

        Quarantined PASIDs stay held in the backend (so the kernel cannot give them to
        anyone either) until they leave it; the allocator reports them then
        (take_expired). Returns True when they were kept.
        """
        if self.allocator.quarantine.enabled:
            return True
        if exact:  # a client's free: all or nothing, its error is the request's
            self._backend_free_exact(freed)
        else:  # a set's end: best effort, never undoes the destroy
            self._backend_free(freed)
        return False

    def _backend_free(self, pasids: Iterable[int]) -> None:
        for lo, hi in runs(pasids):
            try:
                self.backend.free(lo, hi)
            except PasidError as exc:
                # The kernel's free returns nothing; a failure here leaves the backend
                # holding more than we do, never less, so no PASID is handed out twice.
                log.error("backend free [%d, %d] failed: %s", lo, hi, exc)

    # -- queries ------------------------------------------------------------------------

    def session_of(self, set_id: int) -> Session | None:
        return self._sessions.get(set_id)

    def sessions(self) -> list[Session]:
        self.require_ready()
        return list(self._sessions.values())

    def info(self) -> Info:
        self.require_ready()
        a = self.allocator
        caps = self.caps
        assert caps is not None
        return Info(
            backend=caps.name,
            pasid_bits=a.pasid_bits,
            capacity=a.capacity,
            in_use=a.in_use,
            reserved=a.reserved,
            sessions=sum(1 for s in self._sessions.values() if s.attached),
            sets=len(self._sessions),
            quotas=self.quotas,
            revision=self.revision,
            quarantined=a.quarantined,
        )
