"""Engine objects as protobuf messages: a set's SetInfo, a List's reply, a WatchEvent.

Shared by the Session stream, the unary calls and the admin servicer, so that a set
reads the same whichever call lists it.
"""

from __future__ import annotations

from collections.abc import Iterable

from pasid.v1 import broker_pb2 as pb

from broker.core import InvalidArgument, runs
from broker.engine import Broker
from broker.engine import Session as BrokerSession
from broker.store import Event


def set_info(sess: BrokerSession, with_ranges: bool = True) -> pb.SetInfo:
    info = pb.SetInfo(
        set_id=sess.session_id,
        session_id=sess.session_id,
        client=sess.client,
        pid=sess.pid,
        count=len(sess.set),
        created_unix=sess.created_unix,
        state="attached" if sess.attached else "detached",
        peer=sess.peer,
        quota=sess.set.quota,
        grace_seconds=sess.grace_seconds,
        detached_unix=0.0 if sess.attached else sess.detached_unix,
    )
    if with_ranges:  # the whole set, with the epoch that goes with it (a witness's)
        info.witness_epoch = sess.tell_witness_epoch()
    h = sess.holder
    if h is not None:
        info.verified = True
        info.uid = h.uid
        info.ns_pid = h.ns_pid
        info.delegated_by_pid = h.delegated_by_pid
    if with_ranges:
        info.ranges.extend(pb.PasidRange(min=lo, max=hi) for lo, hi in runs(sess.set.pasids))
    return info


def list_response(
    broker: Broker, sess: BrokerSession | None, req: pb.ListRequest
) -> pb.ListResponse:
    """List's reply: the caller's own set, or every set (`all_sets`: admins only); one page
    of it when the request asks for pages."""
    sessions = broker.sessions() if req.all_sets else [sess] if sess is not None else []
    return list_page(sessions, True, req.page_size, req.page_token)


# A page holds at most this many entries (a set, or one of its ranges), and stops once it
# passes PAGE_BYTES: gRPC's clients refuse a reply over 4 MiB by default.
MAX_PAGE_ENTRIES = 65536
PAGE_BYTES = 1 << 20
# The most a PasidRange can take on the wire: tag and length, two tagged 32-bit varints.
RANGE_BYTES = 14


def list_page(
    sessions: list[BrokerSession], with_ranges: bool, page_size: int, page_token: str
) -> pb.ListResponse:
    """The sets in set_id order from `page_token` on; everything when page_size is 0.

    A page ends when it holds page_size entries (a set or a range each; at most
    MAX_PAGE_ENTRIES) or PAGE_BYTES. A set whose ranges do not fit continues on the next
    page from the PASID the token names, so even one huge fragmented set pages. Raises
    InvalidArgument for a token this broker did not make."""
    first_set, first_pasid = _parse_page_token(page_token)
    if page_size == 0 and not page_token:
        return pb.ListResponse(sets=[set_info(s, with_ranges) for s in sessions])
    room = min(page_size or MAX_PAGE_ENTRIES, MAX_PAGE_ENTRIES)
    size = 0
    out = pb.ListResponse()
    for sess in sorted(sessions, key=lambda x: x.session_id):
        if sess.session_id < first_set:
            continue
        info = set_info(sess, with_ranges=False)
        cost = info.ByteSize() + 8  # its tag and length in the reply, generously
        if out.sets and (room < 1 or size + cost > PAGE_BYTES):
            out.next_page_token = f"{sess.session_id}:0"
            return out
        room, size = room - 1, size + cost
        if with_ranges:
            start = first_pasid if sess.session_id == first_set else 0
            fits = max(1, min(room, (PAGE_BYTES - size) // RANGE_BYTES))
            got, rest = runs_from(sess.set.pasids.irange(minimum=start), fits)
            info.ranges.extend(pb.PasidRange(min=lo, max=hi) for lo, hi in got)
            room, size = room - len(got), size + RANGE_BYTES * len(got)
            if rest is not None:
                out.sets.append(info)
                out.next_page_token = f"{sess.session_id}:{rest}"
                return out
            if start == 0:  # the whole set in this page: with its witness epoch
                info.witness_epoch = sess.tell_witness_epoch()
        out.sets.append(info)
    return out


def runs_from(pasids: Iterable[int], most: int) -> tuple[list[tuple[int, int]], int | None]:
    """At most `most` inclusive runs of ascending `pasids`, and the first PASID after
    them (None when there is none)."""
    out: list[tuple[int, int]] = []
    lo = hi = -2
    for p in pasids:
        if p == hi + 1:
            hi = p
            continue
        if hi >= 0:
            out.append((lo, hi))
            if len(out) == most:
                return out, p
        lo = hi = p
    if hi >= 0:
        out.append((lo, hi))
    return out, None


def _parse_page_token(token: str) -> tuple[int, int]:
    """'' -> from the start; 'SET:PASID' -> from that set, at that PASID."""
    if not token:
        return 0, 0
    set_text, sep, pasid_text = token.partition(":")
    if not (sep and set_text.isdigit() and pasid_text.isdigit()):
        raise InvalidArgument(f"page_token {token[:40]!r}: not one this broker made")
    return int(set_text), int(pasid_text)


def watch_event(ev: Event) -> pb.WatchEvent:
    return pb.WatchEvent(
        revision=ev.revision,
        ts_unix=ev.ts,
        kind=ev.kind,
        set_id=ev.set_id,
        pasids=[pb.PasidRange(min=lo, max=hi) for lo, hi in runs(ev.pasids)],
        reason=ev.reason,
        verified=ev.uid is not None,
        pid=ev.pid or 0,
        uid=ev.uid or 0,
        ns_pid=ev.ns_pid or 0,
    )
