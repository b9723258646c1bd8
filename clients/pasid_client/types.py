"""Plain results, so callers need not touch protobuf messages."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pasid.v1 import broker_pb2 as pb

ALL = 2**32 - 1  # the widest free: "everything I hold", cheap by design
# Entries (a set, or one of its ranges) asked for per page of a listing: about 200 KB,
# and a few tens of milliseconds of the broker's loop per page, which serves other calls
# between pages. The broker also keeps each page under 1 MiB (gRPC's default receive
# limit is 4 MiB).
LIST_PAGE_SIZE = 16384


def join_pages(pages: Iterable[pb.ListResponse]) -> list[SetView]:
    """The sets of a paged listing, a set split across pages joined back into one."""
    sets: list[pb.SetInfo] = []
    for page in pages:
        for info in page.sets:
            if sets and sets[-1].set_id == info.set_id:
                sets[-1].ranges.extend(info.ranges)
            else:
                sets.append(info)
    return [SetView.from_pb(s) for s in sets]


@dataclass(frozen=True)
class Quotas:
    per_set: int
    per_client: int
    global_: int


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
    version: str
    # The last committed event revision: Watch(revision + 1) follows from here.
    revision: int = 0
    quarantined: int = 0
    # (kind "iommu"|"device", name, pasid_bits, set_id) discovered from the kernel.
    widths: tuple[tuple[str, str, int, int], ...] = ()

    @classmethod
    def from_pb(cls, m: pb.GetInfoResponse) -> Info:
        q = m.quotas
        return cls(
            m.backend,
            m.pasid_bits,
            m.capacity,
            m.in_use,
            m.reserved,
            m.sessions,
            m.sets,
            Quotas(q.per_set, q.per_client, getattr(q, "global")),
            m.version,
            m.revision,
            m.quarantined,
            tuple((w.kind, w.name, w.pasid_bits, w.set_id) for w in m.widths),
        )


@dataclass(frozen=True)
class WithheldView:
    """A PASID in no set that the broker keeps from the pool (PasidAdmin.ListWithheld):
    `kind` "detach" (its DETACH failed), "free" (the backend's free failed) or
    "contested" (only a witness's claim keeps it); `set_id` the gone set (the claimant
    for "contested"); `holder_pid`, `devices` what a "detach" one waits for; `claimant`
    the witness's set that claims it. Zeros: none."""

    pasid: int
    kind: str
    set_id: int = 0
    holder_pid: int = 0
    claimant: int = 0
    devices: tuple[str, ...] = ()

    @classmethod
    def from_pb(cls, m: pb.WithheldPasid) -> WithheldView:
        return cls(m.pasid, m.kind, m.set_id, m.holder_pid, m.claimant, tuple(m.devices))


@dataclass(frozen=True)
class SetView:
    set_id: int
    session_id: int
    client: str
    pid: int
    count: int
    ranges: tuple[tuple[int, int], ...]
    state: str
    created_unix: float
    peer: str = ""
    quota: int = 0
    grace_seconds: int = 0
    # The kernel-verified holder: pid (above; broker's pid namespace), uid (the set counts
    # under it: the holder's, or for a delegated holder its delegator's), and the pid it
    # sees for itself. Unverified (anonymous, TCP): verified False and zeros.
    verified: bool = False
    uid: int = 0
    ns_pid: int = 0
    delegated_by_pid: int = 0
    # When it was detached (wall clock); 0 while a stream holds it.
    detached_unix: float = 0.0

    @classmethod
    def from_pb(cls, m: pb.SetInfo) -> SetView:
        return cls(
            m.set_id,
            m.session_id,
            m.client,
            m.pid,
            m.count,
            tuple((r.min, r.max) for r in m.ranges),
            m.state,
            m.created_unix,
            m.peer,
            m.quota,
            m.grace_seconds,
            m.verified,
            m.uid,
            m.ns_pid,
            m.delegated_by_pid,
            m.detached_unix,
        )

    def pasids(self) -> Iterator[int]:
        for lo, hi in self.ranges:
            yield from range(lo, hi + 1)


@dataclass(frozen=True)
class Event:
    """One entry of the broker's event log (see PasidBroker.Watch)."""

    revision: int
    ts_unix: float
    kind: str
    set_id: int
    ranges: tuple[tuple[int, int], ...]
    reason: str
    # set_created with a verified holder: its pid (broker's namespace), uid, ns_pid.
    verified: bool = False
    pid: int = 0
    uid: int = 0
    ns_pid: int = 0

    @classmethod
    def from_pb(cls, m: pb.WatchEvent) -> Event:
        return cls(
            m.revision,
            m.ts_unix,
            m.kind,
            m.set_id,
            tuple((r.min, r.max) for r in m.pasids),
            m.reason,
            m.verified,
            m.pid,
            m.uid,
            m.ns_pid,
        )

    def pasids(self) -> Iterator[int]:
        for lo, hi in self.ranges:
            yield from range(lo, hi + 1)
