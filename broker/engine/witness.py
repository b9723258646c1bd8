"""Clients are witnesses (issue 22, point 2): on a resume or a re-attach, what the client
says it holds is checked against the store, which may have lost acknowledged changes
(a device error, a restore).

Owns the witness epochs, `Witnesses.reconcile` (re-claim what the store lost, contest
what another set holds, free what a complete witness no longer states), and, after a
restore or an unclean start, the frees held back until every stored set is reconciled.
Apart from sessions.py because none of it moves a set through its lifecycle: it mends
the store's idea of a set's PASIDs from what the set's client says, and a session's
open, end and destroy read the same without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from broker.core import describe_error
from broker.engine.journal import done_future, no_undo
from broker.store import AddPasids, AwaitWitnesses, DeferRefrees, LogConflict, SetWitnessEpoch

if TYPE_CHECKING:
    from broker.engine.broker import Broker
    from broker.engine.sessions import Session

log = logging.getLogger("pasid_broker")

# The free event's reason for what a complete witness freed (docs/durability.md).
REFREE_REASON = "witness: a free acknowledged to the set's client"


@dataclass(frozen=True)
class SetNotice:
    """What a set's client is told unprompted on its stream (SessionResponse.notice),
    once durable: another set's client claims `pasids` of this set ("pasid_contested"),
    or a contest ended by a hand-over between this set and `other_set`
    ("pasid_conflict_resolved"). The engine says it; the service adapter sends it."""

    kind: str
    pasids: tuple[int, ...]
    other_set: int
    reason: str
    received: bool = False  # a hand-over: to this set (else from it)


def new_epoch() -> int:
    """A witness epoch: random, never 0 (no epoch), so that a store rolled back to an
    older one cannot match an epoch a client learnt on a branch the store lost."""
    return secrets.randbits(63) | 1


class Witnesses:
    """What resuming clients state they hold, set against the store's sets."""

    def __init__(self, engine: Broker) -> None:
        self._engine = engine
        # After a restore or an unclean start: every stored set not yet resumed,
        # re-attached or gone, kept after the allocation wait's bound too. While any is,
        # a PASID a complete witness no longer claims may still be one that set's client
        # was given (its alloc lost too): its free waits (_deferred_refrees), so that it
        # cannot go to a third set before that client could claim it back. Both are
        # stored (sets.witness_wait, deferred_refrees): a restart, clean or not, keeps
        # the frees and what they wait for.
        self._unreconciled: set[int] = set()
        self._deferred_refrees: dict[int, list[int]] = {}

    def restore(self, awaited: Iterable[int], deferred: Mapping[int, Sequence[int]]) -> None:
        """At start, before the holders are recovered: the sets still awaited and the
        deferred frees as the last run stored them (recovery kept only the PASIDs each
        set still holds). With none awaited, the frees land once the loop runs."""
        self._unreconciled = set(awaited)
        self._deferred_refrees = {s: list(ps) for s, ps in deferred.items() if ps}
        if self._deferred_refrees:
            log.warning(
                "witness: frees deferred by the last run restored; they wait for %d stored sets",
                len(self._unreconciled),
                extra={"deferred": sorted(self._deferred_refrees)[:32]},
            )
            if not self._unreconciled:
                asyncio.get_running_loop().call_soon(self._run_deferred_refrees)

    def expect(self, set_ids: Iterable[int]) -> None:
        """After a restore or an unclean start: these stored sets are to be reconciled
        (or gone) before a complete witness's free may land; stored, so that a clean
        restart before then keeps the wait."""
        self._unreconciled.update(set_ids)
        if self._unreconciled:
            self._engine.persist(AwaitWitnesses(tuple(sorted(self._unreconciled)), True))

    def seen(self, set_id: int) -> None:
        """A set resumed, re-attached or went (Broker.witness_seen)."""
        if set_id in self._unreconciled:
            self._unreconciled.discard(set_id)
            self._engine.persist(AwaitWitnesses((set_id,), False))
            if not self._unreconciled and self._deferred_refrees:
                # Once the resume's reconcile has run (in this turn: the open is
                # synchronous): a witness claiming one has it handed over, and the set's
                # own witness may withdraw or replace its deferral. A set's end: not in
                # the middle of its destroy. Later is safe: the set still holds them.
                asyncio.get_running_loop().call_soon(self._run_deferred_refrees)

    def _defer(self, set_id: int, pasids: Sequence[int]) -> asyncio.Future[None]:
        """The set's deferred frees are now `pasids` (none: forgotten), in memory and in
        the store; resolves once durable."""
        if pasids:
            self._deferred_refrees[set_id] = list(pasids)
        elif self._deferred_refrees.pop(set_id, None) is None:
            return done_future(None)
        return self._engine.journal.submit(DeferRefrees(set_id, tuple(pasids)), no_undo, None)

    def new_witness_epoch(self, sess: Session) -> asyncio.Future[None]:
        """Something `sess`'s stream client cannot see changes its set (a unary call by
        token, a resume or re-attach by hand): complete witnesses stating the old epoch
        are partial from now on. Stored in the journal before the change's own records,
        so never behind them. Resolves once durable (at once when no new one was due)."""
        if not sess.epoch_told:
            return done_future(None)
        sess.witness_epoch = new_epoch()
        sess.epoch_told = False
        return self._engine.journal.submit(
            SetWitnessEpoch(sess.session_id, sess.witness_epoch), no_undo, None
        )

    def reconcile(
        self, sess: Session, held: Sequence[int], complete_epoch: int = 0
    ) -> asyncio.Future[None]:
        """The client as witness (issue 22): `held` is what it holds in `sess`'s set, as it
        last heard. A PASID the store lost that is still free is claimed for the set again
        (durably: the returned future resolves once it is); one the store gives to another
        set, or holds back, is a conflict: logged at ERROR, a pasid_conflict event on both
        sets, and contested in the allocator (when its holder gives it up it is withheld,
        never back in the pool silently). Results in sess.reclaimed / sess.conflicts.

        A complete witness (`complete_epoch`, the set's current epoch: the client saw
        every change of the set) also frees the set's PASIDs it does not state: frees the
        client was acknowledged that the store lost (sess.refreed). Anything else (a
        partial witness, a stale or zero epoch) leaves them as they are: a PASID is freed
        only on its own set's client's word that it no longer holds it."""
        e = self._engine
        set_id = sess.session_id
        # What another set's complete witness let go of, deferred, that this one claims.
        self._hand_over_deferred(set_id, [p for p in held if p not in sess.set.pasids])
        mine = set(sess.set.pasids)  # with what was handed over to it just now
        # What this set's deferred frees become (None: as they are), stored at the end,
        # after the frees this witness makes.
        deferred: list[int] | None = None
        if complete_epoch and complete_epoch == sess.witness_epoch:
            sess.witness_complete = True
            sess.refreed = sorted(mine.difference(held))
            # This witness's word replaces whatever an earlier one deferred.
            deferred = []
            others = len(self._unreconciled - {set_id})
            if sess.refreed and others:
                # After a loss, a PASID this client freed may since have gone to a set
                # whose alloc of it was lost too, and whose client has not resumed yet:
                # freed now, it could go to a third set first. The free waits for them.
                deferred = list(sess.refreed)
                log.warning(
                    "witness: PASIDs the set's client no longer holds are freed once the"
                    " %d other stored sets are reconciled",
                    others,
                    extra={"session": set_id, "deferred": sess.refreed[:32]},
                )
                sess.refreed = []
        else:
            if complete_epoch:
                log.info(
                    "witness: a complete witness states an old epoch (the set changed where"
                    " its client could not see it); taken as partial",
                    extra={"session": set_id},
                )
            # A partial witness still states what its client holds: a deferred free of
            # one of those (an older word, from before a restore or a loss) is withdrawn.
            earlier = self._deferred_refrees.get(set_id, [])
            if earlier:
                stated = set(held)
                if any(p in stated for p in earlier):
                    deferred = [p for p in earlier if p not in stated]
        want = sorted({p for p in held if p not in mine and 0 < p < e.allocator.namespace.size})
        owners = e.allocator.owners(want)
        free = [p for p in want if p not in owners]
        clash = dict(owners)  # another set's (or quarantined, withheld, reserved: 0)
        sess.reclaimed, sess.conflicts = free, sorted(clash)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        if clash:
            contested = [p for p, o in clash.items() if o]
            e.allocator.contest(contested)
            for p, o in clash.items():
                if not o:  # quarantined: withheld instead, so that no expiry reissues it
                    with contextlib.suppress(ValueError):  # reserved: never reissued
                        e.allocator.withhold([p])
                    # Withheld already (a failed kernel call) counts too: a later DETACH
                    # or free must not put it back in the pool while the witness holds it.
                    if e.allocator.is_withheld(p):
                        contested.append(p)
            # Stored, with this set as the claimant: a restart keeps the contest, and this
            # set's end lets go of it (stuck.Withheld.claimant_gone).
            e.stuck.contested(set_id, contested)
            by_owner: dict[int, list[int]] = {}
            for p, o in clash.items():
                by_owner.setdefault(o, []).append(p)
            log.error(
                "pasid conflict: a resuming client holds PASIDs the store gives to another"
                " set or holds back; they are contested, never reissued silently",
                extra={
                    "session": set_id,
                    "conflicts": sorted(clash)[:32],
                    "owners": sorted(by_owner),
                },
            )
            e.observers.pasid_conflict(set_id, len(clash))
            for o, ps in sorted(by_owner.items()):
                ps_t = tuple(sorted(ps))
                e.journal.submit(
                    LogConflict(set_id, ps_t, f"held by set {o}" if o else "held back"),
                    no_undo,
                    None,
                )
                if o:
                    why = f"claimed by set {set_id}'s client"
                    logged = e.journal.submit(LogConflict(o, ps_t, why), no_undo, None)
                    # Its client is told too (issue 22: a status to both clients).
                    e.tell(o, SetNotice("pasid_contested", ps_t, set_id, why), logged)
        if free:
            got = e.allocator.claim(set_id, free)
            try:
                e.backend_calls.alloc_exact(got)
            except BaseException:
                e.allocator.release(set_id, free)
                sess.reclaimed = []
                raise

            def undo() -> None:
                e.backend_calls.free(got)
                e.allocator.release(set_id, free)

            log.warning(
                "witness: PASIDs the store had lost claimed for their set again",
                extra={"session": set_id, "reclaimed": free[:32], "count": len(free)},
            )
            done = e.journal.submit(AddPasids(set_id, tuple(free)), undo, None)
        if sess.refreed:
            done = self._refree(sess, done)
        if deferred is not None:
            done = _join(done, self._defer(set_id, deferred))
        return done

    def _refree(self, sess: Session, before: asyncio.Future[None]) -> asyncio.Future[None]:
        """Free sess.refreed as the client's own free would (Broker.free_pasids: devices
        detached, backend, quarantine, a free event), logged at WARNING; the future
        resolves once this and `before` are durable. If the free fails before its commit (a
        backend error), it undid itself: the set keeps them, as after a partial witness,
        the open goes on (its set is attached already), and the next complete witness
        tries again."""
        e = self._engine
        set_id = sess.session_id
        ps, claimed = self._claimed(set_id, sess.refreed)
        freed: asyncio.Future[Any] = done_future(0)
        try:
            if ps:
                freed = e.free_pasids(sess, ps, REFREE_REASON)
        except Exception as exc:
            sess.refreed = sorted(p for _c, handed in claimed for p in handed)
            log.error(
                "witness: freeing PASIDs the set's client no longer holds failed; the set"
                " keeps them",
                extra={"session": set_id, "pasids": ps[:32], "error": describe_error(exc)},
            )
        for claimant, handed in claimed:
            freed = _join(freed, e.hand_over(sess, claimant, handed))
        ps = sess.refreed
        if not ps:
            return before
        log.warning(
            "witness: PASIDs the set's client no longer holds freed again (their"
            " acknowledged free was lost by the store)",
            extra={"session": set_id, "refreed": ps[:32], "count": len(ps)},
        )
        e.observers.pasids_refreed(set_id, len(ps))
        return _join(before, freed)

    def _claimed(
        self, set_id: int, pasids: Sequence[int]
    ) -> tuple[list[int], list[tuple[Session, list[int]]]]:
        """Split what set `set_id`'s client no longer holds: those to free, and the
        contested ones that exactly one other live set's witness claims, to hand over
        to it (the conflict resolved: Broker.hand_over). A PASID two witnesses claimed
        is freed, and so withheld, as any contested one: nobody's word settles it."""
        e = self._engine
        free: list[int] = []
        by_id: dict[int, list[int]] = {}
        for p in pasids:
            c = e.stuck.sole_claimant(p)
            if c is not None and c != set_id and e.sets.get(c) is not None:
                by_id.setdefault(c, []).append(p)
            else:
                free.append(p)
        claimed: list[tuple[Session, list[int]]] = []
        for c, ps in sorted(by_id.items()):
            sess = e.sets.get(c)
            assert sess is not None
            claimed.append((sess, ps))
        return free, claimed

    def _hand_over_deferred(self, claimant: int, claimed: Sequence[int]) -> None:
        """A resuming witness claims PASIDs whose free another set's complete witness
        deferred: that set's client no longer holds them, this one does. They are freed
        now (reconcile then claims them for the claimant, if free), or handed over if
        the claimant contested them already. One that another set's witness contests is
        claimed twice now: nobody is handed it."""
        if not self._deferred_refrees:
            return
        want = set(claimed)
        for set_id, pasids in list(self._deferred_refrees.items()):
            mine = [p for p in pasids if p in want]
            if not mine:
                continue
            self._engine.stuck.also_claimed(claimant, mine)
            if self._refree_deferred(set_id, mine, "claimed by another set's witness"):
                self._defer(set_id, [p for p in pasids if p not in want])

    def _run_deferred_refrees(self) -> None:
        """Every stored set is reconciled: the deferred frees happen now."""
        for set_id, pasids in list(self._deferred_refrees.items()):
            if self._refree_deferred(set_id, pasids, "every stored set reconciled"):
                self._defer(set_id, [])

    def _refree_deferred(self, set_id: int, pasids: Sequence[int], why: str) -> bool:
        """A deferred complete witness's free, as it would have been (those its set still
        holds). Its client is not told: the set's witness epoch changes instead, so that
        its next witness relies on a listing. False when it stays deferred (stored): the
        broker is stopping, or the free failed (the next start tries again)."""
        e = self._engine
        sess = e.sets.get(set_id)
        if e.stopping:
            return False
        if sess is None:
            return True  # gone, and its rows with it
        still = [p for p in pasids if p in sess.set.pasids]
        if not still:
            return True
        self.new_witness_epoch(sess)
        still, claimed = self._claimed(set_id, still)
        for claimant, handed in claimed:
            e.hand_over(sess, claimant, handed).add_done_callback(_log_refree_failure)
        if not still:
            return True
        try:
            fut = e.refree(sess, still)
        except Exception as exc:
            log.error(
                "witness: a deferred free failed; the set keeps the PASIDs, still deferred"
                " (the next start tries again)",
                extra={"session": set_id, "error": describe_error(exc)},
            )
            return False
        fut.add_done_callback(_log_refree_failure)
        log.warning(
            "witness: PASIDs the set's client no longer holds freed again (their"
            " acknowledged free was lost by the store): %s",
            why,
            extra={"session": set_id, "refreed": still[:32], "count": len(still)},
        )
        e.observers.pasids_refreed(set_id, len(still))
        return True


def _join(a: asyncio.Future[Any], b: asyncio.Future[Any]) -> asyncio.Future[None]:
    """Resolves once both have: with the first failure (or cancellation) found, else None."""
    out: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def both(_f: asyncio.Future[Any]) -> None:
        if out.done() or not (a.done() and b.done()):
            return
        for f in (a, b):
            if f.cancelled():
                out.cancel()
                return
            if (exc := f.exception()) is not None:
                out.set_exception(exc)
                return
        out.set_result(None)

    a.add_done_callback(both)
    b.add_done_callback(both)
    return out


def _log_refree_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and (exc := fut.exception()) is not None:
        log.error("witness: a deferred free was not stored; the set keeps the PASIDs: %s", exc)
