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
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future as ThreadFuture
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from broker.backends.base import Backend, Capabilities, replay
from broker.core import (
    WIRE_PASID_BITS,
    Allocator,
    BackendError,
    Conflict,
    IoasidSet,
    NotFound,
    PasidError,
    Quarantine,
    Quotas,
    StoreError,
    Unsupported,
    runs,
)
from broker.store import (
    AddPasids,
    CreateSet,
    DestroySet,
    Record,
    RemovePasids,
    SetRow,
    SqliteStore,
)

log = logging.getLogger("pasid_broker")

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

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="pasid-store")
        self._pending: list[_Entry] = []
        self._inflight: list[_Entry] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def submit(self, record: Record, undo: Callable[[], None], result: T) -> asyncio.Future[T]:
        fut: asyncio.Future[T] = self._loop.create_future()
        self._pending.append(_Entry(record, undo, fut, result))
        self._idle.clear()
        if self._inflight is None:
            self._kick()
        return fut

    def _kick(self) -> None:
        batch, self._pending = self._pending, []
        self._inflight = batch
        records = [e.record for e in batch]
        cf = self._executor.submit(self._store.commit, records)
        cf.add_done_callback(lambda f: self._loop.call_soon_threadsafe(self._done, batch, f))

    def _done(self, batch: list[_Entry], f: ThreadFuture[None]) -> None:
        self._inflight = None
        exc = f.exception()
        if exc is None:
            for e in batch:
                if not e.future.done():
                    e.future.set_result(e.result)
        else:
            later, self._pending = self._pending, []
            err = exc if isinstance(exc, StoreError) else StoreError(f"store commit failed: {exc}")
            log.error(
                "store commit failed; undoing %d changes",
                len(batch) + len(later),
                extra={"error": str(err)},
            )
            for e in reversed(batch + later):
                try:
                    e.undo()
                except Exception:  # an undo must not stop the others
                    log.exception("undo failed for %r", e.record)
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
    ) -> None:
        self.backend = backend
        self.store = store
        self.quotas = quotas or Quotas()
        self.reserved_ranges = tuple(reserved)
        self.quarantine = quarantine or Quarantine()
        self.max_grace = max_grace
        self.restart_grace = restart_grace
        self.clock = clock
        self.caps: Capabilities | None = None
        self._allocator: Allocator | None = None
        self._journal: Journal | None = None
        self._sessions: dict[int, Session] = {}
        self._by_token: dict[str, Session] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._next_set_id = 1
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
        """Open the backend, load and check the store, replay, and reclaim the departed."""
        t0 = time.perf_counter()
        caps = self.backend.open()
        if caps.pasid_bits > WIRE_PASID_BITS:
            raise Unsupported(
                f"backend {caps.name} reports pasid_bits {caps.pasid_bits} > {WIRE_PASID_BITS},"
                " the most the wire (and the seed's int return) can carry"
            )
        self.caps = caps
        log.info(
            "backend %s open: pasid_bits %d from %s",
            caps.name,
            caps.pasid_bits,
            caps.pasid_bits_source,
        )
        # The quarantine measures time on the monotonic clock: a wall-clock step must not
        # release a PASID early. It lives in memory only (docs/quarantine.md).
        self._allocator = Allocator(
            caps.pasid_bits,
            reserved=self.reserved_ranges,
            quotas=self.quotas,
            quarantine=self.quarantine,
            clock=time.monotonic,
            report_expired=True,
        )
        snap = self.store.open()
        stored_bits = snap.meta.get("pasid_bits")
        if stored_bits != str(caps.pasid_bits):
            self.store.set_meta("pasid_bits", str(caps.pasid_bits))
        held: list[int] = []
        for row in snap.sets:
            s = self._allocator.create_set(row.set_id, row.client, row.quota)
            try:
                self._allocator.claim(row.set_id, snap.holdings[row.set_id])
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
        held.sort()
        replayed = replay(self.backend, held)
        self._next_set_id = snap.next_set_id
        self._journal = Journal(self.store)
        for sess in list(self._sessions.values()):
            if not _pid_alive(sess.pid):
                self._destroy(sess, "client exited before restart")
            else:
                self._schedule_reclaim(
                    sess, max(self.restart_grace, sess.grace_seconds), "grace expired after restart"
                )
        self.ready = True
        log.info(
            "recovered %d sets, %d PASIDs replayed into %s in %.3f s",
            len(snap.sets),
            replayed,
            caps.name,
            time.perf_counter() - t0,
        )

    async def stop(self) -> None:
        """Keep every set (restored with its grace at the next start) and close cleanly."""
        self.stopping = True
        self.ready = False
        for h in self._timers.values():
            h.cancel()
        self._timers.clear()
        if self._journal is not None:
            await self._journal.drain()
            self._journal.close()
        self.store.close()
        self.backend.close()

    # -- sessions -----------------------------------------------------------------------

    async def open_session(
        self, client: str, pid: int = 0, grace_seconds: int = 0, resume_token: str = ""
    ) -> tuple[Session, str, bool]:
        """A new session with a new set, or the one `resume_token` names; (session, token,
        resumed). Raises NotFound for an unknown token, Conflict if it is attached."""
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
            log.info("session resumed", extra={"session": sess.session_id, "held": len(sess.set)})
            return sess, resume_token, True

        grace = min(max(grace_seconds, 0), self.max_grace)
        set_id = self._next_set_id
        self._next_set_id += 1
        token = secrets.token_urlsafe(24)
        th = hash_token(token)
        now = self.clock()
        s = self.allocator.create_set(set_id, client)
        sess = Session(s, pid, grace, th, now)
        self._sessions[set_id] = sess
        self._by_token[th] = sess

        def undo() -> None:
            self.allocator.destroy_set(set_id)
            self._forget(sess)

        row = SetRow(set_id, client, pid, s.quota, grace, th, now)
        await self.journal.submit(CreateSet(row), undo, None)
        log.info(
            "session opened",
            extra={"session": set_id, "client": client, "pid": pid, "grace": grace},
        )
        return sess, token, False

    def authenticate(self, session_id: int, token: str) -> Session:
        """The live session that (session_id, token) names; NotFound otherwise."""
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
                extra={"session": sess.session_id, "reason": reason, "grace": sess.grace_seconds},
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
            self._destroy(sess, reason)

    def _destroy(self, sess: Session, reason: str) -> asyncio.Future[None]:
        """Free the whole set: allocator, then backend, then store."""
        set_id = sess.session_id
        client = sess.client
        quota = sess.set.quota
        freed = self.allocator.destroy_set(set_id)
        self._forget(sess)
        self._backend_release(freed)

        def undo() -> None:
            s = self.allocator.create_set(set_id, client, quota)
            self._backend_alloc_exact(self.allocator.claim(set_id, freed))
            sess.set = s
            self._sessions[set_id] = sess
            self._by_token[sess.token_hash] = sess
            self._schedule_reclaim(sess, 1.0, reason)  # retry: the store may recover

        log.info(
            "set destroyed",
            extra={"session": set_id, "client": client, "freed": len(freed), "reason": reason},
        )
        return self.journal.submit(DestroySet(set_id, reason), undo, None)

    def _forget(self, sess: Session) -> None:
        self._sessions.pop(sess.session_id, None)
        self._by_token.pop(sess.token_hash, None)

    # -- requests -----------------------------------------------------------------------

    def alloc(self, sess: Session, lo: int, hi: int, count: int = 1) -> asyncio.Future[list[int]]:
        """Allocate and queue the commit; the future resolves once durable. Checks raise."""
        self._require_attached(sess)
        set_id = sess.session_id
        got = self.allocator.alloc(set_id, lo, hi, count)
        # Quarantine over: the backend may let go of them now (before it is asked for
        # `got`, which may include some of them).
        self._backend_free(self.allocator.take_expired())
        try:
            self._backend_alloc_exact(got)
        except BaseException:
            self.allocator.release(set_id, got)
            raise

        def undo() -> None:
            self._backend_free(got)
            self.allocator.release(set_id, got)

        return self.journal.submit(AddPasids(set_id, tuple(got)), undo, got)

    def free(self, sess: Session, lo: int, hi: int) -> asyncio.Future[int]:
        """Free the session's PASIDs in [lo, hi]; resolves to the count once durable."""
        self._require_attached(sess)
        set_id = sess.session_id
        freed = self.allocator.free_range(set_id, lo, hi)
        if not freed:
            return _done_future(0)
        held_back = self._backend_release(freed)

        def undo() -> None:
            if held_back:  # the backend still holds what is still quarantined
                self._backend_alloc_exact(self.allocator.claim(set_id, freed))
            else:
                self._backend_alloc_exact(freed)
                self.allocator.claim(set_id, freed)

        return self.journal.submit(RemovePasids(set_id, tuple(freed)), undo, len(freed))

    def _require_attached(self, sess: Session) -> None:
        if self._sessions.get(sess.session_id) is not sess:
            raise NotFound(f"session {sess.session_id} has ended")
        if self.stopping:
            raise Unsupported("broker is shutting down")

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

    def _backend_release(self, freed: list[int]) -> bool:
        """A set gave these up: free them in the backend, unless they went to quarantine.

        Quarantined PASIDs stay held in the backend (so the kernel cannot give them to
        anyone either) until they leave it; the allocator reports them then
        (take_expired). Returns True when they were kept.
        """
        if self.allocator.quarantine.enabled:
            return True
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
        return list(self._sessions.values())

    def info(self) -> Info:
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
            quarantined=a.quarantined,
        )
