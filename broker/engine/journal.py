"""The journal: group commit to the store, and exact undo when a commit fails.

Every state change is applied in memory first, then queued here with the undo that
reverses it. A change's future resolves only once its batch is durable (acknowledged =
durable: fsynced, with the default --durability fsync); a failed batch is undone newest
first and nothing in it is acknowledged. Commits run on a writer thread, never on the
event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from broker.core import StoreError, StoreFailed, describe_error
from broker.engine.observers import Observer
from broker.store import (
    AwaitWitnesses,
    CreateSet,
    Event,
    Record,
    ReleaseWithheld,
    SaveQuotas,
    SqliteStore,
    Withhold,
)
from broker.store import writer as store_writer

log = logging.getLogger("pasid_broker")

T = TypeVar("T")
U = TypeVar("U")


# A queued change besides its record: how to reverse it, its future, what it resolves to.
# A tuple, and the records in a list of their own, because the common batch is many
# one-PASID allocs and the store takes the records as they are (docs/performance.md).
_Waiter = tuple[Callable[[], None], "asyncio.Future[Any]", Any]

# How long one slow commit keeps readiness NOT_SERVING after it ended (commit_stalled).
SLOW_HOLD = 5.0

# While commits fail, a small write (Store.probe) is tried this often, so that readiness
# learns that they land again even when no request comes to try one (an unready broker
# is sent none).
PROBE_SECONDS = 1.0

# Failed writes that, lasting the journal's `give_up_after` seconds, end the broker as a
# failed fsync does: the device or the filesystem refuses writes (EIO; EROFS or EPERM
# from a filesystem that turned read-only: SQLITE_IOERR_WRITE, SQLITE_READONLY_*), which
# clears only once the operator has unmounted and repaired it, and that needs the broker
# gone from it. SQLITE_FULL clears in place (space freed): the broker waits for it.
GIVE_UP_CODES = ("SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN")


class CommitPacer:
    """When a batch is flushed: on the loop's next turn, or DELAY later.

    Under calls that each arrive alone (16 unary Alloc callers: grpc.aio hands the
    handlers one call per completion event, so a batch flushed on the next turn held 1.1
    records), waiting DELAY for the calls already on their way made batches of about 7
    and cut the broker's CPU per call by a third (docs/performance.md). For one caller
    the wait would only be latency, and session streams batch 6-8 already. So it delays
    only where it has seen it pay: after RUN small batches in a row (SMALL records or
    fewer), each within SOON of the last, it tries one delayed batch; while delayed
    batches gather at least GATHERED more records it keeps delaying; when one does not,
    it flushes at once again. A try that gathered nothing doubles the run needed before
    the next (up to MAX_RUN): one caller's back-to-back requests are rarely delayed.
    """

    DELAY = 0.001  # libuv's timers count whole milliseconds
    RUN = 8
    MAX_RUN = 256
    SOON = 0.002
    SMALL = 2
    GATHERED = 2

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.delaying = False
        self._run = 0  # small batches in a row, each soon after the last
        self._wait = self.RUN  # how long a run must be before the next try
        self._last = -1.0  # when the last batch was flushed
        self._trying = False  # the batch being delayed is a try, not the delaying mode

    def delay(self) -> float:
        """Seconds to wait before flushing the batch being started (0: the next turn)."""
        if self.delaying:
            return self.DELAY
        if self._run >= self._wait:
            self._run = 0
            self._trying = True
            return self.DELAY
        return 0.0

    def flushed(self, size: int, delayed: bool) -> None:
        """A batch of `size` records is being committed; it waited DELAY if `delayed`."""
        now = self._clock()
        if delayed:
            paid = size >= 1 + self.GATHERED
            if paid:
                self._wait = self.RUN
            elif self._trying:  # a try that gathered nothing: try less often
                self._wait = min(2 * self._wait, self.MAX_RUN)
            # else: delaying stops after a lull; the next try comes after RUN again
            self.delaying = paid
            self._trying = False
        elif size <= self.SMALL and now - self._last < self.SOON:
            self._run += 1
        else:
            self._run = 0
        self._last = now


class WriterThread:
    """The store's one thread: runs the jobs handed to it in order, and hands each one's
    outcome (its result, or the exception it raised) back to the loop, one
    call_soon_threadsafe per job. A job is a whole batch, so a commit costs one hand-off
    each way however many requests it carries. Leaner than a one-thread
    ThreadPoolExecutor (no concurrent Future, condition or semaphore per job): about
    half the CPU per round trip (docs/performance.md)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Callable[[Any], None]] | None]
        self._jobs = queue.SimpleQueue()
        # A daemon: an exit that skips close() must not hang on it. Nothing is lost by
        # that: a change is acknowledged only after its commit returned here.
        self._thread = threading.Thread(target=self._run, name="pasid-store", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], Any], done: Callable[[Any], None]) -> None:
        """Run job() on the thread, then done(its result or exception) on the loop."""
        self._jobs.put((job, done))

    def close(self) -> None:
        """Run what was handed over, then stop the thread."""
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, done = item
            try:
                out = job()
            except BaseException as exc:  # the loop hears of it, as of a result
                out = exc
            # RuntimeError: the loop is closed, nobody waits for it any more.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(done, out)


class Journal:
    """Group commit on a writer thread that owns the store's connection.

    A record submitted while no batch is in flight schedules a flush for the loop's next
    turn, so everything queued in this turn (all the requests grpc delivered in one
    wakeup) commits in one transaction; or, when CommitPacer has seen it pay, a
    millisecond later. The flush hands the batch to the writer thread and returns: the
    event loop never waits on the disk (a commit fsyncs by default, and a slow disk must
    not stall health checks, GetInfo or the release of a dead holder's set). Records
    submitted while a batch commits form the next one, so the slower the disk, the larger
    the batches: the fsync is paid once per batch, not per request. At most one batch is
    in flight, so batches commit in order. When a batch fails, it and everything queued
    after it (which may depend on it) are undone newest first and fail with the
    StoreError; nothing of them was acknowledged. A StoreFailed (a failed fsync: the
    store can no longer be trusted) does the same, then fails every later submit at once
    and calls `on_failure` once: the broker stops and exits. `observer` hears every
    commit_done / commit_failed, on the loop.

    Between the first failed commit and the next one that lands, commits are failing
    (`failing_since`; readiness is NOT_SERVING): a small write is tried every
    PROBE_SECONDS meanwhile. If they keep failing with an I/O error (GIVE_UP_CODES) for
    `give_up_after` seconds (0: never), that becomes a StoreFailed too.
    """

    def __init__(
        self,
        store: SqliteStore,
        on_commit: Callable[[list[Event]], None] | None = None,
        *,
        observer: Observer | None = None,
        on_failure: Callable[[StoreFailed], None] | None = None,
        give_up_after: float = 0.0,
    ) -> None:
        self._store = store
        self._give_up_after = give_up_after
        self._on_commit = on_commit
        self._observer = observer if observer is not None else Observer()
        self._on_failure = on_failure
        self._loop = asyncio.get_running_loop()
        self._writer = WriterThread(self._loop)
        self._records: list[Record] = []  # queued, not yet in a batch
        self._waiters: list[_Waiter] = []  # the same changes' undo, future, result
        self._inflight = False  # a batch is scheduled or committing
        self._pacer = CommitPacer()
        self._delayed = False  # the scheduled batch waits CommitPacer.DELAY
        self._idle = asyncio.Event()
        self._idle.set()
        # When the batch on the writer thread was handed over (monotonic; 0: none), and
        # how long the last one took: readiness (commit_stalled).
        self._committing_since = 0.0
        self.last_commit_seconds = 0.0
        self._last_commit_end = 0.0
        # Set once, at the first StoreFailed: nothing is committed or acknowledged after.
        self.failure: StoreFailed | None = None
        # The checkpoint due CHECKPOINT_SECONDS after a commit, on the writer thread (so
        # that the main file is never far behind the WAL, however small: issue 22).
        self._checkpoint_timer: asyncio.TimerHandle | None = None
        # Since when (monotonic; 0: the last write landed) writes fail, with what, and
        # the next probe write (PROBE_SECONDS).
        self.failing_since = 0.0
        self.failing_error: StoreError | None = None
        self._probe_timer: asyncio.TimerHandle | None = None

    def submit(self, record: Record, undo: Callable[[], None], result: T) -> asyncio.Future[T]:
        """Queue `record`; the future resolves to `result` once it is durable."""
        fut: asyncio.Future[T] = self._loop.create_future()
        if self.failure is not None:  # the store is not trusted any more: refuse, undone
            _undo(record, undo)
            fut.set_exception(StoreError(self.failure.message))
            return fut
        self._records.append(record)
        self._waiters.append((undo, fut, result))
        if not self._inflight:
            self._schedule()
        return fut

    def commit_stalled(self, bound: float) -> bool:
        """Whether commits are slower than `bound` seconds: the batch on the writer
        thread has been there that long, or the last one took that long and ended less
        than SLOW_HOLD ago (so that a probe every few seconds sees it, and an idle broker
        is not held unready by one slow commit for ever)."""
        now = time.monotonic()
        since = self._committing_since
        if since and now - since > bound:
            return True
        return self.last_commit_seconds > bound and now - self._last_commit_end < SLOW_HOLD

    def failing_seconds(self) -> float:
        """How long commits have been failing, none landing since (0.0: they land)."""
        since = self.failing_since
        return time.monotonic() - since if since else 0.0

    def _write_landed(self) -> None:
        self.failing_since = 0.0
        self.failing_error = None
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None

    def _write_failed(self, err: StoreError) -> None:
        """A commit or a probe failed without StoreFailed: commits are failing; give up
        (StoreFailed) once an I/O error has lasted give_up_after, else probe again."""
        now = time.monotonic()
        if not self.failing_since:
            self.failing_since = now
        self.failing_error = err
        lasted = now - self.failing_since
        if (
            self._give_up_after
            and lasted >= self._give_up_after
            and err.code.startswith(GIVE_UP_CODES)
        ):
            self._fail(
                StoreFailed(f"store writes failed for {lasted:.0f} s: {err.message}", err.code)
            )
            return
        if self._probe_timer is None:
            self._probe_timer = self._loop.call_later(PROBE_SECONDS, self._probe)

    def _probe(self) -> None:
        """While commits fail: a small write on the writer thread, unless a batch is
        committing (its outcome tells as much); then look again later."""
        self._probe_timer = None
        if self.failure is not None or not self.failing_since:
            return
        if self._inflight:
            self._probe_timer = self._loop.call_later(PROBE_SECONDS, self._probe)
            return
        self._writer.submit(self._store.probe, self._probed)

    def _probed(self, exc: BaseException | None) -> None:
        if self.failure is not None:
            return
        if exc is None:
            self._write_landed()
        elif isinstance(exc, StoreFailed):  # e.g. the probe's fsync failed: fsyncgate
            log.error("store write probe failed", extra={"error": exc.message})
            self._fail(exc)
        else:
            err = (
                exc
                if isinstance(exc, StoreError)
                else StoreError(f"store write probe failed: {describe_error(exc)}")
            )
            self._write_failed(err)

    def _fail(self, exc: StoreFailed) -> None:
        """The first StoreFailed (the callers see to that): nothing is committed or
        acknowledged after it, and the broker exits (on_failure)."""
        self.failure = exc
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None
        if self._on_failure is not None:
            self._on_failure(exc)

    def _schedule(self, at_once: bool = False) -> None:
        """Flush the queued records on the loop's next turn (or CommitPacer's DELAY
        later); `at_once`: now, unless the pacer delays."""
        self._idle.clear()
        self._inflight = True  # taken: submits until the flush join its batch
        delay = self._pacer.delay()
        self._delayed = delay > 0
        if self._delayed:
            self._loop.call_later(delay, self._flush)
        elif at_once:
            self._flush()
        else:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        records, self._records = self._records, []
        waiters, self._waiters = self._waiters, []
        if self.failure is not None:
            self._finish(records, waiters, 0.0, self.failure)
            return
        self._pacer.flushed(len(records), self._delayed)
        self._committing_since = time.monotonic()
        self._writer.submit(
            functools.partial(_timed_commit, self._store, records),
            functools.partial(self._done, records, waiters),
        )

    def _done(
        self,
        records: list[Record],
        waiters: list[_Waiter],
        timed: tuple[float, list[Event] | BaseException],
    ) -> None:
        self._committing_since = 0.0
        seconds, outcome = timed
        self.last_commit_seconds = seconds
        self._last_commit_end = time.monotonic()
        self._finish(records, waiters, seconds, outcome)

    def _finish(
        self,
        records: list[Record],
        waiters: list[_Waiter],
        seconds: float,
        outcome: list[Event] | BaseException,
    ) -> None:
        self._inflight = False
        if not isinstance(outcome, BaseException):
            if self.failing_since:
                self._write_landed()
            if self._records:
                # What was submitted while this batch committed goes to the writer now,
                # before this batch's callers are answered: the disk works on it while
                # the loop sends their replies (a turn later, it idled meanwhile).
                self._schedule(at_once=True)
            if self._checkpoint_timer is None:
                self._checkpoint_timer = self._loop.call_later(
                    store_writer.CHECKPOINT_SECONDS, self._checkpoint
                )
            self._observer.commit_done(records, outcome, seconds)
            for _, fut, result in waiters:
                if not fut.done():  # its caller may have gone (cancelled)
                    fut.set_result(result)
            if self._on_commit is not None:
                self._on_commit(outcome)
        else:
            exc = outcome
            records += self._records
            waiters += self._waiters
            self._records, self._waiters = [], []
            self._observer.commit_failed(records, seconds)
            err = (
                exc
                if isinstance(exc, StoreError)
                else StoreError(f"store commit failed: {describe_error(exc)}")
            )
            first_failure = isinstance(err, StoreFailed) and self.failure is None
            if first_failure:  # before the undos: nothing they submit may commit
                assert isinstance(err, StoreFailed)
                self.failure = err
            if records:
                log.error(
                    "store commit failed; undoing %d changes",
                    len(records),
                    extra={"error": str(err), "sets": sorted({set_of(r) for r in records})},
                )
            for rec, (undo, fut, _) in zip(reversed(records), reversed(waiters), strict=True):
                _undo(rec, undo)
                if not fut.done():
                    fut.set_exception(StoreError(err.message, err.code))
            if first_failure:
                assert isinstance(err, StoreFailed)
                self._fail(err)
            elif self.failure is None:
                self._write_failed(err)
        if self._inflight:  # the next batch is on its way already
            return
        if self._records:
            self._schedule()
        else:
            self._idle.set()

    async def drain(self) -> None:
        await self._idle.wait()

    def close(self) -> None:
        for timer in (self._checkpoint_timer, self._probe_timer):
            if timer is not None:
                timer.cancel()
        self._checkpoint_timer = self._probe_timer = None
        self._writer.close()

    def _checkpoint(self) -> None:
        """The timer's checkpoint, queued behind any commit on the writer thread. A
        failure there is as final as a commit's (Writer.checkpoint: StoreFailed)."""
        self._checkpoint_timer = None
        if self.failure is not None:
            return
        self._writer.submit(self._store.checkpoint, self._checkpointed)

    def _checkpointed(self, exc: BaseException | None) -> None:
        if exc is None:
            return
        if isinstance(exc, StoreFailed) and self.failure is None:
            log.error("store checkpoint failed", extra={"error": str(exc)})
            self._fail(exc)
        else:
            log.warning("store checkpoint failed: %s", describe_error(exc))


def _undo(rec: Record, undo: Callable[[], None]) -> None:
    try:
        undo()
    except Exception:  # an undo must not stop the others
        # Not %r: a CreateSet carries the token's hash, which logs never need.
        log.exception(
            "undo failed for %s",
            type(rec).__name__,
            extra={"session": set_of(rec), "set": set_of(rec)},
        )


def _timed_commit(
    store: SqliteStore, records: Sequence[Record]
) -> tuple[float, list[Event] | BaseException]:
    """On the writer thread: commit (waiting for the lock; a due checkpoint after it),
    and how long it took."""
    t0 = time.perf_counter()
    try:
        out: list[Event] | BaseException = store.commit(records)
    except BaseException as exc:  # reported on the loop, with its duration
        out = exc
    return time.perf_counter() - t0, out


def set_of(rec: Record) -> int:
    """The set a record is about; 0 for broker-wide ones (the default quotas, withheld
    PASIDs' rows, awaited witnesses)."""
    if isinstance(rec, CreateSet):
        return rec.row.set_id
    if isinstance(rec, (SaveQuotas, ReleaseWithheld, AwaitWitnesses)):
        return 0
    if isinstance(rec, Withhold):
        return rec.set_id or 0
    return rec.set_id


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


def no_undo() -> None:
    """The undo of a record that changed no state of its own (a note, an epoch, a log
    line): Journal.submit's `undo` for it."""


def done_future(value: T) -> asyncio.Future[T]:
    fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    fut.set_result(value)
    return fut
