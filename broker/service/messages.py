"""Engine objects as protobuf messages: a set's SetInfo, a List's reply, a WatchEvent.

Shared by the Session stream, the unary calls and the admin servicer, so that a set
reads the same whichever call lists it.
"""

from __future__ import annotations

from pasid.v1 import broker_pb2 as pb

from broker.core import runs
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
    h = sess.holder
    if h is not None:
        info.verified = True
        info.uid = h.uid
        info.ns_pid = h.ns_pid
        info.delegated_by_pid = h.delegated_by_pid
    if with_ranges:
        info.ranges.extend(pb.PasidRange(min=lo, max=hi) for lo, hi in runs(sess.set.pasids))
    return info


def list_response(broker: Broker, sess: BrokerSession | None, all_sets: bool) -> pb.ListResponse:
    """List's reply: the caller's own set, or every set (`all_sets`: admins only)."""
    if all_sets:
        return pb.ListResponse(sets=[set_info(s) for s in broker.sessions()])
    assert sess is not None
    return pb.ListResponse(sets=[set_info(sess)])


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
