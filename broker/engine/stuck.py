"""PASIDs a destroyed set left that the kernel may still use: withheld from the pool until
the kernel has let go of them (issue 22, point 7; docs/quarantine.md, "A failed kernel
call at a set's end").

Two kernel calls free a number when a set ends, and either may fail:

- DETACH (iommufd): the PASID may still be attached to the gone set's device; handed to
  another set, its DMA would land in the old owner's address space. Withheld until a
  DETACH retried every RETRY_SECONDS succeeds, or there is proof that nothing can be
  attached through the device any more (below), when the broker closes its own copies
  of the device fds.
- the backend's free (VFIO: the kernel's ioasid free): the kernel still counts the PASID
  allocated. Withheld until a retried free succeeds (an alloc that picked it would only
  be refused by the kernel meanwhile).

A withheld PASID is in no set, counted as quarantined, and still held in the backend.
It is stored too (a quarantine row of kind "detach" or "free", in the commit of the
set's destroy; broker/store/schema.py), so that a restart, even a kill -9, does not
hand it out: recovery withholds it again (recovery.py) and restore() takes up the wait.
After a restart the broker's copies of the device fds are gone (the kernel closed them
with the old process), so no DETACH can be retried until a live set delegates the same
device again (its key, stored in the "detach" row): that fd is the device's one bound
file, and the DETACH is retried on it (Devices.detach_on). A "free" PASID was replayed
into the backend, and its free is retried.

The rule for a failed DETACH, once no DETACH is left to retry (the holder exited, or a
restart closed the broker's fds): a VFIO cdev is bound to an iommufd through one open
file at a time, and the kernel detaches every PASID attached through it when that
file's last fd closes. So the PASIDs are proven free when no process (but the broker)
has the device open any more: `Devices.open_elsewhere` reads /proc for the device (its
key, stored in the "detach" row), on a thread of its own (`_Look`): it stats every fd
on the host, 0.3 s with 50k fds, which on the event loop stalled health, GetInfo and
releases. The holder's exit is proof only together with that:
a child that inherited the device fd, or a process it was passed to, keeps the binding
and the attachment. While the holder lives, the broker waits for it (it has the device
open). A row without devices (written before migration 0010), or a device open
elsewhere for good, stays withheld, said at ERROR, until the operator releases it
(`pasid-broker withheld --release`, docs/runbook.md, "Withheld PASIDs").

A witness may claim a withheld PASID too (Witnesses.reconcile; `_claimed_by`): when the
kernel lets go it stays withheld until the witness's set is gone (claimant_gone). Its
row keeps both the wait and the claimant (`_rows`, the one place rows are made), so a
restart keeps both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

from broker.backends.base import Devices
from broker.core import Allocator, PasidError, runs
from broker.engine.backend_calls import BackendCalls
from broker.engine.holders import Holder, reopen_holder
from broker.store import Record, ReleaseWithheld, Withhold

log = logging.getLogger("pasid_broker")

RETRY_SECONDS = 1.0
# A gone set's devices found open elsewhere are looked for again after this long: the
# look reads every process's fds in /proc.
RESCAN_SECONDS = 10.0
# A look through /proc still going after this long stops, proving nothing (looked for
# again after RESCAN_SECONDS): the one look thread is never held for good.
LOOK_SECONDS = 30.0


class _Look:
    """One look through /proc for a gone set's devices, on a thread of its own: its
    answer (Devices.open_elsewhere) arrives on the event loop, which retries at once."""

    def __init__(self, devices: tuple[str, ...]) -> None:
        self.devices = devices
        self.done = False
        self.why: str | None = None


class DetachWait(NamedTuple):
    """A gone set's PASIDs whose DETACH failed, as a restart finds them in the store."""

    holder: Holder | None
    pasids: list[int]
    devices: tuple[str, ...]  # their devices' keys (iommufd_checks.device_key)


def _alive(holder: Holder) -> bool:
    fd = reopen_holder(holder)
    if fd is None:
        return False
    os.close(fd)
    return True


# A row's fields besides its PASIDs: kind, set_id, holder pid, holder start, claimant,
# devices.
_RowKey = tuple[str, int | None, int | None, int | None, int | None, str | None, str | None]


def _by_first(item: tuple[_RowKey, list[int]]) -> int:
    """Rows in the order of their first PASID (deterministic, as the tests read them)."""
    return item[1][0]


class Withheld:
    """The engine's withheld PASIDs and the timer that retries the kernel calls."""

    def __init__(
        self,
        devices: Devices | None,
        allocator: Callable[[], Allocator],
        backend_calls: BackendCalls,
        persist: Callable[[Record], None],
        quarantine_until: Callable[[], float | None],
    ) -> None:
        self._devices = devices
        self._allocator = allocator
        self._backend_calls = backend_calls
        # Queues a record in the journal: it commits in the same batch as the set's
        # destroy queued with it, and before any later alloc that may pick what we let go.
        self._persist = persist
        self._quarantine_until = quarantine_until
        self._holders: dict[int, Holder | None] = {}  # gone set -> its verified holder
        # Restored after a restart (no device fds any more): gone set -> its holder, the
        # PASIDs and their devices, which no process may have open any more.
        self._restored: dict[int, DetachWait] = {}
        # Gone set -> when its devices may be looked for again, and what was last said.
        self._rescan: dict[int, tuple[float, str]] = {}
        # Gone set -> its look through /proc, running (one at a time) or answered.
        self._looks: dict[int, _Look] = {}
        self._looking = False
        self._unfreed: set[int] = set()  # the backend's free failed
        self._freed_by: dict[int, int] = {}  # an unfreed PASID -> its gone set (its row)
        # Contested PASIDs -> the witness's set that claims them (Witnesses.reconcile).
        self._claimed_by: dict[int, int] = {}
        # A contested PASID's further claimants: the sets of witnesses that claimed it
        # before (or besides) the one the row names. While any is left, none of them is
        # handed it, and the row's claimant's end passes the claim on to one of them
        # instead of letting the PASID go. In memory only: a restart keeps the row's.
        self._also_claimed: dict[int, set[int]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def restore(
        self,
        detach: dict[int, DetachWait],
        unfreed: Mapping[int, int | None],
        claimed_by: dict[int, int] | None = None,
        also_claimed: Mapping[int, Iterable[int]] | None = None,
    ) -> None:
        """After recovery withheld the stored PASIDs again: wait for each "detach" set's
        devices to be open nowhere, retry each "free" (the backend holds it again:
        replayed), and know again which witness's set claims each contested one."""
        self._restored.update(detach)
        self._unfreed.update(unfreed)
        self._freed_by.update((p, s) for p, s in unfreed.items() if s is not None)
        self._claimed_by.update(claimed_by or {})
        for p, sets in (also_claimed or {}).items():
            if p in self._claimed_by and (others := set(sets) - {self._claimed_by[p]}):
                self._also_claimed[p] = others
        if detach or unfreed:
            self._schedule()

    def contested(self, witness_set: int, pasids: Sequence[int], *, store: bool = True) -> None:
        """A witness's set claims these while the store gives them to another set (or
        holds them back); the allocator contests them: stored, with the claimant (and
        whatever kernel call a withheld one still waits for). Not `store`: the rows are
        there still (a hand-over's batch failed, and its deletion of them with it)."""
        for p in pasids:
            prev = self._claimed_by.get(p)
            if prev is not None and prev != witness_set:
                self._also_claimed.setdefault(p, set()).add(prev)
            if p in self._also_claimed:
                self._also_claimed[p].discard(witness_set)
            self._claimed_by[p] = witness_set
        if store:
            self._persist_rows(pasids)

    def also_claimed(self, witness_set: int, pasids: Iterable[int]) -> None:
        """Another witness's set claims these contested PASIDs too (before its own contest
        is recorded): while both do, neither is handed one. Stored with its rows."""
        added = []
        for p in pasids:
            if self._claimed_by.get(p, witness_set) != witness_set:
                self._also_claimed.setdefault(p, set()).add(witness_set)
                added.append(p)
        self._persist_rows(added)

    def sole_claimant(self, pasid: int) -> int | None:
        """The one witness's set that claims a contested PASID; None if none or several."""
        if self._also_claimed.get(pasid):
            return None
        return self._claimed_by.get(pasid)

    def claimants(self) -> Mapping[int, int]:
        """Each contested PASID and the witness's set its row names (read only)."""
        return self._claimed_by

    def resolved(self, pasids: Sequence[int]) -> None:
        """Contested PASIDs that their set's client let go of went to their claimant's set
        (Broker.hand_over): nobody contests them any more; their rows go, in the
        hand-over's batch."""
        for p in pasids:
            self._claimed_by.pop(p, None)
            self._also_claimed.pop(p, None)
        self._allocator().uncontest(pasids)
        self._persist(ReleaseWithheld(tuple(pasids)))

    def claimant_gone(self, set_id: int) -> list[int]:
        """The witness's set `set_id` is gone (durably): nobody claims its contested PASIDs
        besides the set the store gave them to. One that set still holds is no longer
        contested; one it gave up (withheld) goes back to the pool, or to the time
        quarantine, unless a failed kernel call withholds it too. Returns the PASIDs let
        go of. One that another witness's set claims too stays contested, the claim
        passed on to that set (its row names it)."""
        others_gone = [p for p, sets in self._also_claimed.items() if set_id in sets]
        for p in others_gone:
            self._also_claimed[p].discard(set_id)
            if not self._also_claimed[p]:
                del self._also_claimed[p]
        mine = sorted(p for p, s in self._claimed_by.items() if s == set_id)
        # Rows that named it among the others (and still have a claimant) lose it.
        self._persist_rows(p for p in others_gone if p not in mine)
        passed = [p for p in mine if self._also_claimed.get(p)]
        for p in passed:
            others = self._also_claimed[p]
            self._claimed_by[p] = min(others)
            others.discard(self._claimed_by[p])
            if not others:
                del self._also_claimed[p]
        if passed:
            self._persist_rows(passed)
            log.warning(
                "contested PASIDs stay withheld: the witness's set %d is gone, but another"
                " witness's set claims them too",
                set_id,
                extra={"session": set_id, "pasids": passed[:32]},
            )
        mine = [p for p in mine if p not in passed]
        if not mine:
            return []
        for p in mine:
            del self._claimed_by[p]
        a = self._allocator()
        withheld = set(a.withheld)
        busy = set(self._unfreed)
        for wait in self._restored.values():
            busy.update(wait.pasids)
        if self._devices is not None:
            for ps in self._devices.stuck().values():
                busy.update(ps)
        held = [p for p in mine if p not in withheld]
        free = [p for p in mine if p in withheld and p not in busy]
        a.uncontest(held)
        # Not held in the backend (its set's free or destroy let go there), unless under
        # a quarantine (then its expiry frees it there, as any quarantined PASID).
        a.release_withheld(free)
        if held:
            self._persist(ReleaseWithheld(tuple(held)))
        # A failed kernel call still withholds these: their rows keep the wait, not the
        # claim (a restart must not wait for a gone claimant).
        self._persist_rows([p for p in mine if p in withheld and p in busy])
        if free:
            self._persist(ReleaseWithheld(tuple(free), self._quarantine_until()))
            log.warning(
                "contested PASIDs released: the witness's set %d is gone and the other"
                " set gave them up",
                set_id,
                extra={"session": set_id, "pasids": free[:32]},
            )
        return free

    def detach_failed(self, set_id: int, pasids: Sequence[int], holder: Holder | None) -> None:
        """The set is gone but the kernel kept these attached: keep them from the pool."""
        a = self._allocator()
        a.withhold(pasids)
        # A contested one was withheld already (its set gave it up): its row now waits
        # for the DETACH too, and keeps its claimant.
        kept = [p for p in sorted(pasids) if a.is_withheld(p)]
        self._holders[set_id] = holder
        self._persist_rows(kept)
        log.error(
            "set %d: DETACH failed for %d PASIDs; withheld from the pool until a DETACH"
            " succeeds or, the holder gone, no process has the device open",
            set_id,
            len(kept),
            extra={"session": set_id, "pasids": kept[:32]},
        )
        self._schedule()

    def free_failed(self, set_id: int, pasids: Sequence[int]) -> None:
        """The set is gone but the backend did not free these: keep them from the pool."""
        a = self._allocator()
        a.withhold(pasids)
        # A contested one was withheld already (its set gave it up): its free is retried
        # too, and its row keeps its claimant.
        kept = [p for p in sorted(pasids) if a.is_withheld(p)]
        self._unfreed.update(kept)
        self._freed_by.update((p, set_id) for p in kept)
        self._persist_rows(kept)
        log.error(
            "set %d: the backend's free failed for %d PASIDs; withheld from the pool until"
            " a retried free succeeds",
            set_id,
            len(kept),
            extra={"session": set_id, "pasids": kept[:32]},
        )
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(RETRY_SECONDS, self.retry)

    def _retry_now(self) -> None:
        """A look answered: retry at once rather than at the next tick, so that the
        answer is used while it is fresh."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(0, self.retry)

    def retry(self) -> list[int]:
        """Retry the kernel calls; let go of the sets whose holder exited; release what
        the kernel no longer uses. Returns those PASIDs."""
        self._timer = None
        done: list[int] = []
        if self._devices is not None:
            done = self._devices.retry_detach()
            stuck = self._devices.stuck()
            for set_id, holder in list(self._holders.items()):
                if set_id not in stuck:
                    del self._holders[set_id]
                    self._rescan.pop(set_id, None)
                elif (holder is None or not _alive(holder)) and self._unused(
                    set_id, stuck[set_id], self._devices.stuck_devices(set_id)
                ):
                    done += self._devices.let_go(set_id)
                    del self._holders[set_id]
        for set_id, wait in list(self._restored.items()):
            if self._restored_detached(set_id, wait):
                done += wait.pasids
                del self._restored[set_id]
        if done:
            # The kernel let go, but a live witness may still claim some (a contest):
            # those stay withheld until its set ends (claimant_gone); the backend's free
            # is theirs all the same, as claimant_gone expects.
            claimed = [p for p in done if p in self._claimed_by]
            free = self._allocator().release_withheld(p for p in done if p not in claimed)
            if free or claimed:  # detached; now the backend's free (which may fail too)
                self._unfreed.update(self._backend_calls.free(sorted([*free, *claimed])))
                self._allocator().withhold(self._unfreed.intersection(free))
        # A set that took one back (its destroy undone) holds it again: not ours to free.
        self._unfreed.intersection_update(self._allocator().withheld)
        for lo, hi in runs(sorted(self._unfreed)):
            try:
                self._backend_calls.backend.free(lo, hi)
            except PasidError:
                continue
            self._unfreed.difference_update(range(lo, hi + 1))
            self._allocator().release_withheld(
                p for p in range(lo, hi + 1) if p not in self._claimed_by
            )
            done.extend(range(lo, hi + 1))
        for p in [p for p in self._freed_by if p not in self._unfreed]:
            del self._freed_by[p]
        if done:
            self._store(done)
            log.info("withheld PASIDs released", extra={"pasids": sorted(done)[:32]})
        waiting = self._holders.keys() | self._restored.keys()
        for set_id in [s for s in self._looks if s not in waiting]:
            del self._looks[set_id]  # its wait ended otherwise: its answer is not needed
        if self._unfreed or self._restored or (self._devices is not None and self._devices.stuck()):
            self._schedule()
        return sorted(done)

    def _restored_detached(self, set_id: int, wait: DetachWait) -> bool:
        """After a restart: a device of the gone set that a live set has delegated again
        (the same device, so the same bound file) gets the DETACH retried on it; success
        clears it. The others are cleared by the rule of _unused once the holder is
        gone. True when every device is cleared."""
        if wait.devices and self._devices is not None:
            left = tuple(k for k in wait.devices if not self._devices.detach_on(k, wait.pasids))
            if left != wait.devices:
                wait = self._restored[set_id] = wait._replace(devices=left)
                if not left:
                    self._rescan.pop(set_id, None)
                    log.info(
                        "set %d: the DETACH retried on its device, delegated again, succeeded",
                        set_id,
                        extra={"session": set_id, "pasids": wait.pasids[:32]},
                    )
                    return True
        if wait.holder is not None and _alive(wait.holder):
            return False
        return self._unused(set_id, wait.pasids, wait.devices)

    def _unused(self, set_id: int, pasids: Sequence[int], devices: Sequence[str]) -> bool:
        """The proof that a gone set's PASIDs are detached, once the broker has no DETACH
        to retry (its holder exited; after a restart its copies of the fds are gone):
        no other process has any of its devices open. The holder's exit alone is not:
        a child that inherited its device fd, or one it was passed to, keeps the device
        bound, and the PASIDs attached. Until then they stay withheld, said once at
        ERROR, and the devices are looked for again every RESCAN_SECONDS."""
        when, said = self._rescan.get(set_id, (0.0, ""))
        if time.monotonic() < when:
            return False
        if self._devices is None:
            why: str | None = "this backend has no devices to look for"
        else:
            why = self._devices.still_delegated(devices)
        if why is None:
            look = self._looks.get(set_id)
            if look is None or look.devices != tuple(devices):
                self._look(set_id, tuple(devices))
                return False
            if not look.done:
                return False
            del self._looks[set_id]
            why = look.why
        if why is None:
            self._rescan.pop(set_id, None)
            return True
        self._rescan[set_id] = (time.monotonic() + RESCAN_SECONDS, why)
        if why != said:
            log.error(
                "set %d: %d PASIDs stay withheld (their DETACH failed; no holder is left to"
                " wait for), as %s; they go back once a DETACH succeeds or no process has"
                " the device open, or when the operator releases them (pasid-broker"
                " withheld; docs/runbook.md)",
                set_id,
                len(pasids),
                why,
                extra={"session": set_id, "pasids": list(pasids)[:32], "devices": devices},
            )
        return False

    def _look(self, set_id: int, devices: tuple[str, ...]) -> None:
        """Start the look through /proc for the set's devices on a thread, unless one
        runs already (one at a time: the next set's waits for the next retry)."""
        if self._looking or self._devices is None:
            return
        look = self._looks[set_id] = _Look(devices)
        self._looking = True
        loop = asyncio.get_running_loop()
        find = self._devices.open_elsewhere

        def answered(why: str | None) -> None:
            self._looking = False
            if self._looks.get(set_id) is look:
                look.why, look.done = why, True
                self._retry_now()

        def run() -> None:
            try:
                why = find(devices, LOOK_SECONDS)
            except Exception as exc:  # a look that fails proves nothing
                why = f"the look through /proc failed: {type(exc).__name__}: {exc}"
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(answered, why)

        threading.Thread(target=run, name="pasid-proc-look", daemon=True).start()

    def rows(self) -> list[Withhold]:
        """Every withheld PASID's row as the store has it now (PasidAdmin.ListWithheld)."""
        return self._rows(self._allocator().withheld)

    def _store(self, touched: Sequence[int]) -> None:
        """What retry() changed, for the store: those no longer withheld lose their rows
        (or become quarantine rows); the others' rows say what keeps them now."""
        still = set(self._allocator().withheld).intersection(touched)
        gone = tuple(sorted(set(touched) - still))
        if gone:
            self._persist(ReleaseWithheld(gone, self._quarantine_until()))
        self._persist_rows(still)

    def _persist_rows(self, pasids: Iterable[int]) -> None:
        for rec in self._rows(pasids):
            self._persist(rec)

    def _rows(self, pasids: Iterable[int]) -> list[Withhold]:
        """THE place a withheld or contested PASID's stored row is made, from what keeps
        it now: the kind is what the broker waits for ("detach": a gone set's DETACH, or
        its devices open nowhere, with that set, its holder and devices; "free": the
        backend's free, with the gone set; "contested": only a witness's claim), and
        `claimant` is the witness's set that claims it, whatever the kind. A restart
        reads both back (recovery._restore_withheld). PASIDs that nothing keeps get no
        row."""
        # pasid -> its gone set, that set's holder and devices
        waits: dict[int, tuple[int, Holder | None, str | None]] = {}
        if self._devices is not None:
            for sid, ps in self._devices.stuck().items():
                devices = ",".join(self._devices.stuck_devices(sid)) or None
                for p in ps:
                    waits[p] = (sid, self._holders.get(sid), devices)
        for sid, wait in self._restored.items():
            for p in wait.pasids:
                waits[p] = (sid, wait.holder, ",".join(wait.devices) or None)
        rows: dict[_RowKey, list[int]] = {}
        for p in sorted(set(pasids)):
            claimant = self._claimed_by.get(p)
            also = ",".join(map(str, sorted(self._also_claimed.get(p, ())))) or None
            key: _RowKey
            if p in waits:
                sid, holder, devices = waits[p]
                key = (
                    "detach",
                    sid,
                    holder.pid if holder is not None else None,
                    holder.start_time if holder is not None else None,
                    claimant,
                    devices,
                    also,
                )
            elif p in self._unfreed:
                key = ("free", self._freed_by.get(p), None, None, claimant, None, also)
            elif claimant is not None:
                key = ("contested", claimant, None, None, claimant, None, also)
            else:
                continue
            rows.setdefault(key, []).append(p)
        return [Withhold(tuple(ps), *key) for key, ps in sorted(rows.items(), key=_by_first)]

    def close(self) -> None:
        self._looks.clear()  # a look's late answer finds nothing to retry for
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
