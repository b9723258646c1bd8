"""The broker: allocator, backend and store composed; the requests a session makes.

Every state change runs on the event loop thread in three steps: the allocator decides,
the backend agrees (backend_calls.py), the journal makes it durable (journal.py). A reply
is sent only after its commit (acknowledged = durable). If a step fails, the earlier ones
are undone in reverse, so memory, backend and disk never disagree.

Sessions and the end of sets are in sessions.py, the clients' witnesses in witness.py,
Watch in events.py, start-up in recovery.py; what the engine reports to metrics goes
through observers.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from broker.backends.base import Backend, Capabilities, Devices
from broker.core import (
    ANONYMOUS,
    Allocator,
    Conflict,
    InvalidRange,
    NotFound,
    NotReady,
    PasidError,
    Quarantine,
    Quotas,
    StoreError,
    StoreFailed,
    Unsupported,
    runs,
)
from broker.core.errors import DetachFailed
from broker.core.ioctl import PasidOp, check_pasid_request
from broker.engine.backend_calls import BackendCalls
from broker.engine.events import WATCH_BUFFER, EventFanout
from broker.engine.holders import Holder
from broker.engine.journal import Journal, done_future, no_undo, then
from broker.engine.lifecycle import SetEvent
from broker.engine.observers import Observers
from broker.engine.recovery import recover
from broker.engine.sessions import Session, Sessions
from broker.engine.stuck import Withheld
from broker.engine.witness import REFREE_REASON, SetNotice, Witnesses
from broker.peer.tickets import TicketBook
from broker.store import (
    AddPasids,
    DeferRefrees,
    Event,
    LogConflict,
    Record,
    ReleaseWithheld,
    RemovePasids,
    SaveQuotas,
    SaveSetQuota,
    Snapshot,
    SqliteStore,
    Withhold,
)

log = logging.getLogger("pasid_broker")

# After a restore, new allocations wait at most this long for live holders to re-attach.
WITNESS_WAIT_SECONDS = 30.0


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
    # (kind, name, pasid_bits, set_id) discovered from the kernel (iommufd backend).
    widths: tuple[tuple[str, str, int, int], ...] = ()


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
        identity_share: float = 0.0,
        anonymous_quota: tuple[int, float] = (0, 0.0),
        watch_buffer: int = WATCH_BUFFER,
        clock: Callable[[], float] = time.time,
        observers: Observers | None = None,
        tickets: TicketBook | None = None,
        anonymous: str = "allow",
        devices: Devices | None = None,
        store_error_exit: float = 0.0,
    ) -> None:
        # Whoever watches the engine (metrics) subscribes here at wiring time.
        self.observers = observers if observers is not None else Observers()
        self.backend = backend
        # Delegated devices (the iommufd backend): kernel attachments that follow the sets.
        self.devices = devices
        self.store = store
        # Seconds of failing writes (an I/O error) after which the broker exits as after
        # a failed fsync (Journal: give_up_after); 0: never.
        self.store_error_exit = store_error_exit
        self.quotas = quotas or Quotas()
        self.reserved_ranges = tuple(reserved)
        self.quarantine = quarantine or Quarantine()
        self.max_grace = max_grace
        # With no per-identity quota given: this fraction of the capacity (set at start).
        self.identity_share = identity_share
        # What all anonymous callers may hold together: N PASIDs, or a share of the
        # capacity (set at start); (0, 0.0) = only the per-identity quota.
        self.anonymous_quota = anonymous_quota
        self.restart_grace = restart_grace
        self.clock = clock
        self.caps: Capabilities | None = None
        self._allocator: Allocator | None = None
        self._snapshot: Snapshot | None = None  # from open_store() until start()
        self._store_seconds = 0.0  # counted in recovery's time, as before the split
        self._journal: Journal | None = None
        self.backend_calls = BackendCalls(backend, lambda: self.allocator.quarantine.enabled)
        # PASIDs a failed kernel call left in use at a set's end: withheld (stuck.py).
        self.stuck = Withheld(
            devices, lambda: self.allocator, self.backend_calls, self.persist, self.quarantine_until
        )
        # tickets: the peer socket's handshakes (broker/peer); anonymous: --anonymous.
        self.sets = Sessions(self, tickets, anonymous)
        # What resuming clients state they hold, against the store (issue 22).
        self.witnesses = Witnesses(self)
        self.events = EventFanout(store, watch_buffer)
        self.stopping = False
        self.ready = False
        # Readiness as the daemon decided it (broker/service/server.py `set_ready`): False
        # while recovering, draining, or while commits fail or are slow. The health
        # service's readiness and the pasid_broker_ready gauge both say this one value.
        self.serving = False
        # After a restore or an unclean start: allocations wait for these sets' holders
        # (witness_seen); `_waiting_after` names which, for the logs.
        self._awaited_holders: set[int] | None = None
        self._witness_gate: asyncio.Event | None = None
        self._waiting_after = ""
        # The revision the last clean stop recorded (its marker, taken at open), and
        # whether the store is known to hold what clients were told: only then may a stop
        # be recorded as clean (a stop during the wait leaves the next start waiting too).
        self._clean_stop: int | None = None
        self._store_whole = False
        # Set at the first StoreFailed (a failed fsync): the broker acknowledges nothing
        # more and its server exits, so that a restart recovers from what is durable.
        self.failure: StoreFailed | None = None
        self.failed = asyncio.Event()

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

    @property
    def revision(self) -> int:
        """The last committed event revision."""
        return self.events.revision

    async def open_store(self) -> None:
        """Open, migrate and check the store and load its state, in a worker thread.
        StoreError (never a repair) for a file that is not a database or not ours: the
        daemon does this before anything listens, so a bad file refuses the start."""
        t0 = time.perf_counter()
        # The clean-stop marker goes before anything may write: a crash from here on
        # leaves none behind.
        self._clean_stop = await asyncio.to_thread(self.store.take_clean_stop)
        self._snapshot = await asyncio.to_thread(self.store.open)
        self._store_seconds = time.perf_counter() - t0

    async def start(self) -> None:
        """Open the backend, load and check the store (unless open_store() has), replay,
        and reclaim the departed.

        The heavy part runs in a worker thread so that the loop keeps answering health
        checks (NOT_SERVING) meanwhile; requests get UNAVAILABLE until `ready`.
        """
        if self._snapshot is None:
            await self.open_store()
        snapshot, self._snapshot = self._snapshot, None
        assert snapshot is not None
        t0 = time.perf_counter() - self._store_seconds
        r = await asyncio.to_thread(
            recover,
            self.backend,
            self.store,
            snapshot,
            reserved=self.reserved_ranges,
            quotas=self.quotas,
            quarantine=self.quarantine,
        )
        self.caps = r.caps
        self._allocator = r.allocator
        self._apply_quotas(self._starting_quotas(r.snapshot.quotas, r.allocator.capacity))
        n, share = self.anonymous_quota
        r.allocator.anonymous_quota = max(1, int(r.allocator.capacity * share)) if share else n
        self.events.revision = r.snapshot.revision
        self.sets.restore(r.sessions, r.snapshot.next_set_id)
        self._journal = Journal(
            self.store,
            self.events.publish,
            observer=self.observers,
            on_failure=self._store_failed,
            give_up_after=self.store_error_exit,
        )
        # Before the holders: a witness's set reclaimed now lets go of its contest.
        also = {
            p: [int(s) for s in row.also_claimed.split(",")]
            for p, row in r.snapshot.withheld.items()
            if row.also_claimed
        }
        self.stuck.restore(r.withheld_detach, r.withheld_unfreed, r.claimed_by, also)
        # A claimant whose set's destroy was durable but the end of its claims was not
        # (a crash between the two commits): its claims end now.
        claimants = set(r.claimed_by.values()).union(*also.values())
        for set_id in sorted(claimants - {s.set_id for s in r.snapshot.sets}):
            self.stuck.claimant_gone(set_id)
        self._restore_witness_wait(r.snapshot)
        self.sets.recover_holders(self.restart_grace)
        if r.stale_withheld:
            self.persist(ReleaseWithheld(tuple(r.stale_withheld)))
        self._log_start_kind(r.snapshot.restored, r.snapshot.revision)
        self.ready = True
        took = time.perf_counter() - t0
        sets = len(r.snapshot.sets)
        self.observers.recovered(took, r.replayed, sets)
        log.info(
            "recovered %d sets, %d PASIDs replayed into %s in %.3f s",
            sets,
            r.replayed,
            r.caps.name,
            took,
            extra={"sets": sets, "replayed": r.replayed, "seconds": round(took, 6)},
        )

    def _restore_witness_wait(self, snap: Snapshot) -> None:
        """Before the holders (a set found gone is awaited no more): the sets whose
        witness the last run still awaited, and the frees complete witnesses deferred
        until then, each kept only for PASIDs its set still holds (a free that landed
        before its row was cleared: the row goes now)."""
        deferred: dict[int, list[int]] = {}
        for set_id, pasids in snap.deferred_refrees.items():
            sess = self.sets.get(set_id)
            keep = [p for p in pasids if sess is not None and p in sess.set.pasids]
            if keep:
                deferred[set_id] = keep
            if len(keep) != len(pasids):
                self.persist(DeferRefrees(set_id, tuple(keep)))
        self.witnesses.restore((row.set_id for row in snap.sets if row.witness_wait), deferred)

    def _log_start_kind(self, restored: bool, revision: int) -> None:
        """Say once which kind of start this is; after a restore or an unclean start (no
        valid clean-stop marker: a crash, a kill -9, a failed fsync's exit), hold new
        allocations for the live holders (issue 22)."""
        marker = self._clean_stop
        if restored:
            log.warning("start after a restore", extra={"start": "restored"})
            self.witnesses.expect(s.session_id for s in self.sets.all())
            self._hold_allocs_for_witnesses("restore", "store restored")
        elif marker is None and revision == 0 and not len(self.sets):
            # Nothing was ever committed: no client can have been told anything.
            log.info("first start: a new database", extra={"start": "new"})
        elif marker is not None and marker == revision:
            log.info(
                "clean start: the last stop was clean at revision %d",
                revision,
                extra={"start": "clean"},
            )
        else:
            why = (
                "no clean-stop marker (a crash, kill -9 or failed fsync ended the last run)"
                if marker is None
                else f"the clean-stop marker names revision {marker}, the store {revision}"
            )
            log.warning("unclean start: %s", why, extra={"start": "unclean"})
            self.witnesses.expect(s.session_id for s in self.sets.all())
            self._hold_allocs_for_witnesses("unclean start", "unclean start")
        self._store_whole = self._witness_gate is None

    def _hold_allocs_for_witnesses(self, after: str, what: str) -> None:
        """After a restore or an unclean start the store may be behind what clients were
        told: new allocations wait (at most WITNESS_WAIT_SECONDS, capped by
        --restart-grace) until every set whose verified holder is alive has resumed or
        re-attached (a witnessed one is reconciled then) or is gone, so that a PASID the
        store lost is not handed to another set before its holder could claim it back."""
        waiting = {s.session_id for s in self.sets.all() if s.holder is not None}
        if not waiting:
            return
        self._awaited_holders = waiting
        self._witness_gate = asyncio.Event()
        self._waiting_after = after
        bound = min(WITNESS_WAIT_SECONDS, max(self.restart_grace, 1.0))
        asyncio.get_running_loop().call_later(bound, self._open_alloc_gate, "bound reached")
        log.warning(
            "%s: new allocations wait up to %.0f s for %d live holders to re-attach",
            what,
            bound,
            len(waiting),
            extra={"sets": sorted(waiting)[:32]},
        )

    def witness_seen(self, set_id: int) -> None:
        """A set awaited after a restore or an unclean start resumed, re-attached or went."""
        self.witnesses.seen(set_id)
        if self._awaited_holders is not None:
            self._awaited_holders.discard(set_id)
            if not self._awaited_holders:
                self._open_alloc_gate("every live holder re-attached")

    def _open_alloc_gate(self, why: str) -> None:
        gate, self._witness_gate = self._witness_gate, None
        if gate is not None and not gate.is_set():
            left = sorted(self._awaited_holders or ())
            log.info(
                "allocations open after the %s: %s",
                self._waiting_after,
                why,
                extra={"waiting": left[:32]},
            )
            gate.set()
        self._awaited_holders = None
        self._store_whole = True

    def _starting_quotas(self, saved: tuple[int, int, int] | None, capacity: int) -> Quotas:
        """What SetQuotas saved, else the flags, with a per-identity share of the
        namespace (--quota-per-identity N%) worked out now that capacity is known."""
        if saved is not None:
            q = Quotas(*saved)
            if q != self.quotas:
                log.info(
                    "quotas from the store (saved by SetQuotas) replace the flags' values",
                    extra={"per_set": q.per_set, "per_client": q.per_client, "global": q.global_},
                )
            return q
        if self.identity_share and not self.quotas.per_client:
            return replace(self.quotas, per_client=max(1, int(capacity * self.identity_share)))
        return self.quotas

    def store_failing_seconds(self) -> float:
        """How long commits have been failing, none landing since (0.0: they land, or
        the broker is not started)."""
        return self._journal.failing_seconds() if self._journal is not None else 0.0

    def require_ready(self) -> None:
        """Requests before recovery has finished (or while stopping) are UNAVAILABLE."""
        if not self.ready:
            if self.failure is not None:
                raise NotReady(
                    f"the store failed ({self.failure.message}); the broker is exiting to"
                    " recover from what is durable: retry once it is back"
                )
            raise NotReady("broker is recovering its store; retry shortly")

    def _store_failed(self, exc: StoreFailed) -> None:
        """The first StoreFailed: nothing more is acknowledged (the journal refuses every
        commit from now on); the server sees `failed` and exits non-zero."""
        self.failure = exc
        self.ready = False
        log.critical(
            "the store can no longer be trusted; stopping all acknowledgements and exiting"
            " so that a restart recovers from what is durable",
            extra={"error": exc.message},
        )
        self.failed.set()

    async def stop(self) -> None:
        """Keep every set (restored with its grace at the next start) and close cleanly."""
        self.stopping = True
        self.ready = False
        self.sets.close()
        self.stuck.close()  # before the drain: what a retry queued is committed by it
        self.end_watches()
        if self._journal is not None:
            await self._journal.drain()
            self._journal.close()
        if self.failure is None:
            self.store.close()
            self._mark_clean_stop()
        # else: no close, which would checkpoint the WAL from a page cache that can no
        # longer be trusted; the process exits without it (broker.__main__), as after a
        # kill -9, and the next start recovers from what the device holds.
        self.backend.close()

    def _mark_clean_stop(self) -> None:
        """After the last commit and a clean close: the next start need not wait for the
        live holders, unless this run was still waiting for them itself."""
        if not self._store_whole:
            log.warning("stop not recorded as clean: the live holders had not all re-attached")
            return
        try:
            self.store.mark_clean_stop(self.revision)
        except OSError as exc:  # the next start only waits for the holders
            log.error("clean stop not recorded: %s", exc.strerror)

    def persist(self, record: Record) -> None:
        """Queue a record whose change memory has made already and need not undo: a
        withheld or contested PASID's row, a detach time. It commits in order with every
        other change; a failure is logged (the store then keeps the more cautious state,
        or the set's destroy in the same batch is undone and retried)."""
        fut = self.journal.submit(record, no_undo, None)
        fut.add_done_callback(_log_persist_failure)

    # -- events (events.py) ---------------------------------------------------------------

    def end_watches(self) -> None:
        self.events.end_watches()

    def watch(self, from_revision: int, set_id: int | None = None) -> AsyncIterator[Event]:
        """Events from `from_revision` (0: from now on), replayed then live, each once;
        only set `set_id`'s when given (a tenant's own set)."""
        return self.events.watch(from_revision, set_id)

    # -- sessions (sessions.py) -----------------------------------------------------------

    def open_session(
        self,
        client: str,
        pid: int = 0,
        grace_seconds: int = 0,
        resume_token: str = "",
        peer: str = "",
        ticket: str = "",
        owner: str = ANONYMOUS,
        reattach_set_id: int = 0,
        held: Sequence[int] | None = None,
        complete_epoch: int = 0,
    ) -> tuple[Session, str, bool, asyncio.Future[None]]:
        """A new session with a new set, or the one `resume_token` names: (session, token,
        resumed, created), `created` resolving once the new set is durable. The set's
        owner (the per-identity quota's key) is the ticket holder's uid, else `owner`
        (the transport's identity); a set resumes only for its owner.

        Synchronous: the set exists when this returns, so the caller must own it at once
        (end_session in a finally that covers the wait for `created`): no await between
        the two can leave a set that no stream owns. `ticket` (from the peer handshake)
        makes its holder the set's; `pid` is then only a claim that must match it.
        Raises Unauthenticated (ticket unknown, replayed or expired; anonymous refused),
        InvalidArgument (a pid claim that is not the holder), NotFound for an unknown
        resume token, Conflict if it is attached or the holder has exited, NotReady while
        draining after SIGTERM.

        `reattach_set_id` with a ticket: that set back, detached, without its token, if
        the ticket's holder is the set's verified holder (NotFound otherwise).

        `held` (a resume or re-attach with OpenSession.witness): the PASIDs the client
        holds in the set; the store is reconciled with them (Witnesses.reconcile), and
        `created` resolves once the reclaimed ones are durable. `complete_epoch` (a
        complete witness, OpenSession.witness_complete, with the epoch it states): when
        it is the set's, the set's PASIDs `held` omits are freed too, durably before
        `created` resolves. A resume or re-attach without a witness (by hand) gives the
        set a new witness epoch."""
        self.require_ready()
        if self.stopping:
            # A stream begun before SIGTERM may still send its open. No set is taken up or
            # made now: the drain ends no stream opened from here, and every set is kept
            # for the restart, where the client (its reconnect retries on UNAVAILABLE)
            # finds it.
            if resume_token or reattach_set_id:
                raise NotReady("broker is shutting down; resume after the restart")
            raise NotReady("broker is shutting down; open the session after the restart")
        return self.sets.open(
            client,
            pid,
            grace_seconds,
            resume_token,
            peer,
            ticket,
            owner,
            reattach_set_id,
            held,
            complete_epoch,
        )

    def change_by_token(self, sess: Session) -> None:
        """A unary call (by token, not on the set's stream) is about to change the set:
        its stream client will not see it, so its complete witnesses stating the current
        witness epoch are partial from now on (docs/durability.md)."""
        self.sets.require_attached(sess)
        self.witnesses.new_witness_epoch(sess)

    def held_sets(self, ticket: str, peer: str) -> list[Session]:
        """The sets whose verified holder is the ticket's holder process (the ticket is
        used up). Raises Unauthenticated for a bad ticket, InvalidArgument without one."""
        self.require_ready()
        return self.sets.held_by(ticket, peer)

    def ticket_uid(self, ticket: str) -> int | None:
        """The verified uid a live peer-handshake ticket carries, without using it up."""
        return self.sets.holders.ticket_uid(ticket)

    def authenticate(self, session_id: int, token: str) -> Session:
        """The live session that (session_id, token) names; NotFound otherwise."""
        self.require_ready()
        return self.sets.authenticate(session_id, token)

    def end_session(
        self, sess: Session, reason: str, event: SetEvent = SetEvent.STREAM_BROKEN
    ) -> asyncio.Future[None] | None:
        """A session's stream is over, as `event` says (a half-close, an open abandoned, a
        broken stream): lifecycle.py's table decides (destroy, detach, grace). Returns
        the destroy's future if the set is destroyed."""
        return self.sets.apply(sess, event, reason)

    def release(self, sess: Session) -> asyncio.Future[int]:
        """Its client releases the set (ReleaseRequest): destroyed now, whatever its
        grace; resolves to how many PASIDs it freed, once durable."""
        return self.sets.release(sess)

    def reclaim(self, sess: Session, reason: str) -> asyncio.Future[None]:
        """The broker takes a set now, whatever its grace: its stream, if any, ends."""
        return self.sets.reclaim(sess, reason)

    async def revoke(self, set_id: int, reason: str) -> int:
        """Admin: destroy a set now; returns how many PASIDs it held."""
        return await self.sets.revoke(set_id, reason)

    async def set_quotas(self, set_id: int, per_set: int, per_client: int, global_: int) -> None:
        """Admin: change quotas, durably (the store's values win over flags at start).

        Answered after the commit, like any change; a failed commit restores the old ones.
        """
        if set_id:
            sess = self.sets.get(set_id)
            if sess is None:
                raise NotFound(f"no set {set_id}")
            old_quota = sess.set.quota
            sess.set.quota = per_set

            def undo_set() -> None:
                sess.set.quota = old_quota

            await self.journal.submit(SaveSetQuota(set_id, per_set), undo_set, None)
            log.info("set quota changed", extra={"set": set_id, "quota": per_set})
            return
        old = self.quotas
        self._apply_quotas(Quotas(per_set, per_client, global_))

        def undo() -> None:
            self._apply_quotas(old)

        await self.journal.submit(SaveQuotas(per_set, per_client, global_), undo, None)
        log.info(
            "quotas changed",
            extra={"per_set": per_set, "per_client": per_client, "global": global_},
        )

    def _apply_quotas(self, quotas: Quotas) -> None:
        self.quotas = quotas
        self.allocator.quotas = quotas

    # -- requests -----------------------------------------------------------------------

    def alloc(
        self, sess: Session, lo: int, hi: int, count: int = 1, device: str = ""
    ) -> asyncio.Future[list[int]]:
        """Allocate and queue the commit; the future resolves once durable. Checks raise
        (after a restore, while allocations wait for the witnesses: in the future)."""
        gate = self._witness_gate
        if gate is not None:

            async def after_gate() -> list[int]:
                await gate.wait()
                return await self._alloc(sess, lo, hi, count, device)

            return asyncio.ensure_future(after_gate())
        return self._alloc(sess, lo, hi, count, device)

    def _alloc(
        self, sess: Session, lo: int, hi: int, count: int = 1, device: str = ""
    ) -> asyncio.Future[list[int]]:
        """Allocate and queue the commit; the future resolves once durable. Checks raise.

        With `device` (a name the set's holder delegated), each PASID is attached to it in
        the kernel before the reply; the range is clipped to the device's PASID width."""
        set_id = sess.session_id
        bc = self.backend_calls
        try:
            self.sets.require_attached(sess)
            if not sess.attached:
                raise Conflict(
                    f"session {set_id} is detached (in its grace period, no stream holds"
                    " it): resume it before allocating; nobody would free what it got"
                )
            if device:
                lo, hi = self._device_range(set_id, device, lo, hi)
            got = self.allocator.alloc(set_id, lo, hi, count)
            # Quarantine over: the backend may let go of them now (before it is asked for
            # `got`, which may include some of them).
            expired = self.allocator.take_expired()
            if expired:
                bc.free(expired)
            try:
                bc.alloc_exact(got)
            except BaseException:
                self.allocator.release(set_id, got)
                raise
            if device:
                self._attach_all(set_id, device, got)
        except PasidError as exc:
            self.observers.alloc_refused(exc)  # success is counted when the commit lands
            raise

        def undo() -> None:
            if self.devices is not None:
                self.devices.release(set_id, got)
            bc.free(got)
            self.allocator.release(set_id, got)

        return self.journal.submit(AddPasids(set_id, tuple(got)), undo, got)

    def free(self, sess: Session, lo: int, hi: int) -> asyncio.Future[int]:
        """Free the session's PASIDs in [lo, hi]; resolves to the count once durable."""
        set_id = sess.session_id
        try:
            self.sets.require_attached(sess)
            freed = self.allocator.free_range(set_id, lo, hi)
        except PasidError as exc:
            self.observers.free_refused(exc)
            raise
        if not freed:
            self.observers.free_nothing()
            return done_future(0)
        return self._free_taken(sess, freed)

    def free_pasids(self, sess: Session, pasids: Sequence[int], reason: str) -> asyncio.Future[int]:
        """Free exactly these PASIDs of the session's set (each held by it), as a client's
        free does; `reason` goes in the free event. For a complete witness (Witnesses.
        reconcile): what its client no longer holds. Resolves to the count once durable."""
        self.sets.require_attached(sess)
        return self._free_exact(sess, pasids, reason)

    def refree(self, sess: Session, pasids: Sequence[int]) -> asyncio.Future[int]:
        """A deferred complete witness's free: attached or not (the client's word stands)."""
        return self._free_exact(sess, pasids, REFREE_REASON)

    def hand_over(self, src: Session, dst: Session, pasids: Sequence[int]) -> asyncio.Future[None]:
        """A conflict resolved: contested PASIDs that `src`'s client no longer holds (its
        complete witness) go to `dst`, whose witness claimed them, straight from set to
        set (never through the pool; the backend holds them throughout, and `dst`'s
        client uses them already). Detached from `src`'s devices first. Logged as a free
        on `src` and an alloc on `dst`, with a pasid_conflict_resolved event on both;
        the contest's rows go in the same batch. Resolves once durable; a failed commit
        puts them back in `src`, contested again."""
        ps = sorted(pasids)
        a, b = src.session_id, dst.session_id
        if self.devices is not None:
            self.devices.release(a, ps)
        self.allocator.move(a, b, ps)
        self.stuck.resolved(ps)
        # dst's client was told they were no longer its own (SessionOpened.conflicts):
        # its set changed where it could not see, so its next witness is partial and
        # its library lists the set again, rather than freeing them on a stale view.
        self.witnesses.new_witness_epoch(dst)

        def undo() -> None:
            self.allocator.move(b, a, ps)
            self.allocator.contest(ps)
            self.stuck.contested(b, ps, store=False)

        runs_text = ", ".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in runs(ps))
        log.warning(
            "pasid conflict resolved: set %d's client no longer holds PASIDs %s; handed to"
            " set %d, whose client claimed them",
            a,
            runs_text,
            b,
            extra={"session": a, "set": b, "pasids": ps[:32], "count": len(ps)},
        )
        self.observers.pasid_conflict_resolved(b, len(ps))
        t = tuple(ps)
        done = self.journal.submit(
            RemovePasids(a, t, None, f"{REFREE_REASON}; to set {b}"), undo, None
        )
        self.journal.submit(AddPasids(b, t), no_undo, None)
        for sid, other, why, received in (
            (a, b, f"handed to set {b}, whose client holds them", False),
            (b, a, f"from set {a}", True),
        ):
            self.journal.submit(LogConflict(sid, t, why, "pasid_conflict_resolved"), no_undo, None)
            # Both clients are told (the same batch: once `done` is durable).
            notice = SetNotice("pasid_conflict_resolved", t, other, why, received)
            self.tell(sid, notice, done)
        return done

    def tell(self, set_id: int, notice: SetNotice, after: asyncio.Future[Any]) -> None:
        """Tell set `set_id`'s client `notice` on its stream once `after` is durable
        (never what a failed commit undid). A set no stream holds then learns of a
        contest at its resume or re-attach (contested_in), or from Watch."""

        def durable(f: asyncio.Future[Any]) -> None:
            if f.cancelled() or f.exception() is not None:
                return
            sess = self.sets.get(set_id)
            if sess is not None and sess.on_notice is not None:
                sess.on_notice(notice)

        after.add_done_callback(durable)

    def contested_in(self, sess: Session) -> list[int]:
        """The set's PASIDs that another set's witness claims (SessionOpened.contested)."""
        mine, set_id = sess.set.pasids, sess.session_id
        return sorted(p for p, c in self.stuck.claimants().items() if c != set_id and p in mine)

    def _free_exact(self, sess: Session, pasids: Sequence[int], reason: str) -> asyncio.Future[int]:
        set_id = sess.session_id
        freed: list[int] = []
        try:
            for lo, hi in runs(sorted(pasids)):
                freed += self.allocator.free_range(set_id, lo, hi)
        except BaseException:
            self.allocator.claim(set_id, freed)
            raise
        if not freed:
            return done_future(0)
        return self._free_taken(sess, freed, reason)

    def _free_taken(self, sess: Session, freed: list[int], reason: str = "") -> asyncio.Future[int]:
        """The rest of a free, once the allocator let go of `freed`: devices detached,
        backend (quarantine rules), durable; each step undone if a later one fails."""
        set_id = sess.session_id
        bc = self.backend_calls
        if self.devices is not None:
            # Detach before the numbers can go to anyone else (the kernel's DETACH never
            # fails; a failed commit leaves the set holding them, unattached).
            try:
                self.devices.release(set_id, freed)
            except BaseException:
                self.allocator.claim(set_id, freed)
                raise
        try:
            held_back = bc.release(freed, exact=True)
        except BaseException:
            self.allocator.claim(set_id, freed)
            raise

        def undo() -> None:
            if held_back:  # the backend still holds what is still quarantined
                bc.alloc_exact(self.allocator.claim(set_id, freed))
            else:
                bc.alloc_exact(freed)
                self.allocator.claim(set_id, freed)

        rec = RemovePasids(set_id, tuple(freed), self.quarantine_until(), reason)
        return self.journal.submit(rec, undo, len(freed))

    def quarantine_until(self) -> float | None:
        """The wall-clock time PASIDs freed now may be reissued, for the store (so a
        restart keeps them quarantined); None without --quarantine-seconds."""
        secs = self.allocator.quarantine.seconds
        return time.time() + secs if secs > 0 else None

    def pasid_request(
        self, sess: Session, argsz: int, flags: int, lo: int, hi: int
    ) -> asyncio.Future[int]:
        """VFIO_IOMMU_PASID_REQUEST semantics: the PASID for ALLOC, 0 for FREE."""
        op = check_pasid_request(argsz, flags, lo, hi, self.allocator.pasid_bits)
        if op is PasidOp.ALLOC:
            return then(self.alloc(sess, lo, hi, 1), lambda got: got[0])
        return then(self.free(sess, lo, hi), lambda _freed: 0)

    # -- delegated devices (iommufd) ----------------------------------------------------

    def _device_range(self, set_id: int, device: str, lo: int, hi: int) -> tuple[int, int]:
        """[lo, hi] within the device's PASID width, refused before any ioctl if outside."""
        if self.devices is None:
            raise Unsupported(
                f"alloc names device {device!r}, but backend {self.backend.name} attaches no"
                " devices (use --backend iommufd)"
            )
        handle = self.devices.device(set_id, device)
        top = (1 << handle.pasid_bits) - 1
        if lo > top:
            raise InvalidRange(
                f"[{lo}, {hi}] is beyond device {device}'s PASID width"
                f" ({handle.pasid_bits} bits: at most {top})"
            )
        return lo, min(hi, top)

    def _attach_all(self, set_id: int, device: str, got: list[int]) -> None:
        """Attach each granted PASID, all or none (the numbers go back on failure)."""
        assert self.devices is not None
        done: list[int] = []
        try:
            for p in got:
                self.devices.attach(set_id, device, p)
                done.append(p)
        except BaseException:
            self.devices.release(set_id, done)
            self.backend_calls.free(got)
            self.allocator.release(set_id, got)
            raise

    def drop_devices(self, set_id: int, holder: Holder | None = None) -> list[int]:
        """A set is gone: detach all its attachments before its numbers are reused.

        Returns the PASIDs the kernel would not detach: withheld from the pool (stuck.py),
        and the caller must not free them in the backend either."""
        if self.devices is None:
            return []
        try:
            self.devices.drop_set(set_id)
        except DetachFailed as exc:
            self.stuck.detach_failed(set_id, exc.pasids, holder)
            return list(exc.pasids)
        except PasidError as exc:  # not a DETACH (closing fds): nothing stays attached
            log.error("set %d: dropping its devices failed: %s", set_id, exc.message)
        return []

    # -- backup ---------------------------------------------------------------------------

    async def backup(self) -> Path | bytes:
        """A consistent copy of the store, made on its own connection in a worker thread
        (the broker holds the file exclusively: an operator's backup comes through
        here): a new 0600 file beside the database, which the caller removes; or, when
        that filesystem is full (when a backup matters most), the copy's bytes, made in
        memory (the database's size, about twice, while it lasts: docs/sizing.md)."""
        self.require_ready()
        copy, pages, size = await asyncio.to_thread(_backup_beside, self.store)
        log.info("backup made", extra={"pages": pages, "bytes": size})
        return copy

    # -- queries ------------------------------------------------------------------------

    def session_of(self, set_id: int) -> Session | None:
        return self.sets.get(set_id)

    def sessions(self) -> list[Session]:
        self.require_ready()
        return self.sets.all()

    def withheld(self) -> list[Withhold]:
        """The withheld PASIDs and what keeps each (stuck.py), as their store rows."""
        self.require_ready()
        return self.stuck.rows()

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
            sessions=self.sets.attached(),
            sets=len(self.sets),
            quotas=self.quotas,
            revision=self.revision,
            quarantined=a.quarantined,
            widths=tuple(self.devices.widths()) if self.devices is not None else (),
        )


def _log_persist_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and (exc := fut.exception()) is not None:
        log.error("store: a withheld PASID or detach time was not stored: %s", exc)


def _backup_beside(store: SqliteStore) -> tuple[Path | bytes, int, int]:
    """Broker.backup's work, off the loop: (the copy, its pages, its bytes). In memory
    when no file can be made beside the database (out of blocks or inodes, read-only)."""
    db = store.path
    try:
        fd, name = tempfile.mkstemp(prefix=f".{db.name}.backup-", dir=db.parent)
    except OSError as exc:
        log.warning(
            "backup: no file can be made beside the database; made in memory",
            extra={"error": f"{exc.strerror} ({exc.filename})"},
        )
        pages, data = store.backup(None)
        return data, pages, len(data)
    os.close(fd)  # 0600 (mkstemp); SQLite writes the copy into it
    path = Path(name)
    try:
        pages, _ = store.backup(path)
        return path, pages, path.stat().st_size
    except StoreError as exc:
        path.unlink(missing_ok=True)
        if "SQLITE_FULL" not in exc.message:
            raise
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    pages, data = store.backup(None)
    return data, pages, len(data)
