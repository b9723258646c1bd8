"""What the engine tells whoever watches it (metrics, today): a tiny observer list.

The engine knows no metric names: it calls these hooks where things happen, and
whoever is interested subscribes at wiring time (broker/service/server.py). Every hook
runs on the event loop thread and must be cheap and must not raise.
"""

from __future__ import annotations

from collections.abc import Sequence

from broker.store import Event, Record


class Observer:
    """Every hook a no-op: subclass and override the ones you watch."""

    def commit_done(
        self, records: Sequence[Record], events: Sequence[Event], seconds: float
    ) -> None:
        """A group commit landed: `records` are durable; it took `seconds` on the writer."""

    def commit_failed(self, records: Sequence[Record], seconds: float) -> None:
        """A group commit failed: `records` (its batch and all queued after) were undone."""

    def alloc_refused(self, exc: BaseException) -> None:
        """An alloc was refused before reaching the journal (success is a commit_done)."""

    def free_refused(self, exc: BaseException) -> None:
        """A free was refused before reaching the journal."""

    def free_nothing(self) -> None:
        """A free found nothing of its session's in its range (no commit needed)."""

    def session_opened(self, set_id: int, resumed: bool) -> None:
        """A session was opened (durably) or resumed."""

    def set_destroyed(self, set_id: int, reason: str, kind: str, pasids: int) -> None:
        """A set's destroy is durable. kind "set_destroyed": its client ended it;
        "set_reclaimed": the broker took it (grace, exit, revoke, restart)."""

    def set_state_changed(self, set_id: int, kind: str) -> None:
        """A set was detached ("set_detached") or re-attached ("set_reattached")."""

    def recovered(self, seconds: float, replayed: int, sets: int) -> None:
        """Start-up recovery finished."""

    def pasid_conflict(self, set_id: int, pasids: int) -> None:
        """A resuming client (a witness) holds `pasids` PASIDs the store gives elsewhere."""

    def pasid_conflict_resolved(self, set_id: int, pasids: int) -> None:
        """`pasids` contested PASIDs went to set `set_id`, whose witness claimed them, once
        the set the store gave them to had its client's word that it no longer holds them."""

    def pasids_refreed(self, set_id: int, pasids: int) -> None:
        """A complete witness freed `pasids` PASIDs its set held that its client no longer
        holds (acknowledged frees the store lost)."""


class Observers(Observer):
    """Fans every hook out to its subscribers, in subscription order."""

    def __init__(self) -> None:
        self._subs: list[Observer] = []

    def subscribe(self, observer: Observer) -> None:
        self._subs.append(observer)

    def commit_done(
        self, records: Sequence[Record], events: Sequence[Event], seconds: float
    ) -> None:
        for o in self._subs:
            o.commit_done(records, events, seconds)

    def commit_failed(self, records: Sequence[Record], seconds: float) -> None:
        for o in self._subs:
            o.commit_failed(records, seconds)

    def alloc_refused(self, exc: BaseException) -> None:
        for o in self._subs:
            o.alloc_refused(exc)

    def free_refused(self, exc: BaseException) -> None:
        for o in self._subs:
            o.free_refused(exc)

    def free_nothing(self) -> None:
        for o in self._subs:
            o.free_nothing()

    def session_opened(self, set_id: int, resumed: bool) -> None:
        for o in self._subs:
            o.session_opened(set_id, resumed)

    def set_destroyed(self, set_id: int, reason: str, kind: str, pasids: int) -> None:
        for o in self._subs:
            o.set_destroyed(set_id, reason, kind, pasids)

    def set_state_changed(self, set_id: int, kind: str) -> None:
        for o in self._subs:
            o.set_state_changed(set_id, kind)

    def recovered(self, seconds: float, replayed: int, sets: int) -> None:
        for o in self._subs:
            o.recovered(seconds, replayed, sets)

    def pasid_conflict(self, set_id: int, pasids: int) -> None:
        for o in self._subs:
            o.pasid_conflict(set_id, pasids)

    def pasid_conflict_resolved(self, set_id: int, pasids: int) -> None:
        for o in self._subs:
            o.pasid_conflict_resolved(set_id, pasids)

    def pasids_refreed(self, set_id: int, pasids: int) -> None:
        for o in self._subs:
            o.pasids_refreed(set_id, pasids)
