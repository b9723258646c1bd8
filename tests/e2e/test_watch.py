"""Watch: replay from the log, then live, without gap or duplicate across the switch."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest
from pasid_client import Client, Event, OutOfRange, Unavailable

from tests.harness import ROOT, BrokerProcess, wait_until

WRITER = """
import sys
from pasid_client import Client
with Client(sys.argv[1]) as c, c.session("writer") as s:
    for i in range(int(sys.argv[2])):
        got = s.alloc(1, 4000, count=1 + i % 3)
        if i % 2:
            s.free(got[0], got[-1])
"""


def fold(events: list[Event]) -> dict[int, set[int]]:
    """Holdings implied by the event log."""
    held: dict[int, set[int]] = {}
    for e in events:
        if e.kind == "set_created":
            held[e.set_id] = set()
        elif e.kind == "alloc":
            held[e.set_id] |= set(e.pasids())
        elif e.kind == "free":
            held[e.set_id] -= set(e.pasids())
        else:
            held.pop(e.set_id, None)
    return held


def test_replay_then_live_is_gapless_under_concurrent_writes(
    broker: BrokerProcess, admin: Client
) -> None:
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, broker.address, "150"], cwd=ROOT)
        for _ in range(3)
    ]
    got: list[Event] = []
    with Client(broker.address) as c, c.session("anchor") as anchor:
        anchor.alloc(1, 10)
        # start watching from revision 1 while the writers are mid-way
        wait_until(lambda: c.info().revision > 50, 20, what="writers to get going")
        stream = admin.watch(1)

        def collect() -> None:
            for ev in stream:
                got.append(ev)

        t = threading.Thread(target=collect, daemon=True)
        t.start()
        for w in writers:
            assert w.wait(60) == 0
        # a last change after the writers, so we know what the final revision is
        anchor.alloc(1, 10)
        final = c.info().revision
        wait_until(lambda: got and got[-1].revision >= final, 20, what="watch to catch up")
        stream.close()
        revisions = [e.revision for e in got]
        assert revisions == list(range(1, final + 1)), "gap or duplicate"
        held = {sid: sorted(p) for sid, p in fold(got).items()}
        now = {s.set_id: sorted(s.pasids()) for s in admin.list_sets()}
        assert held == now
        kinds = {e.kind for e in got}
        assert {"set_created", "alloc", "free", "set_destroyed"} <= kinds


def test_watch_from_now_sees_only_new_events(client: Client, admin: Client) -> None:
    with client.session("a") as s:
        s.alloc(1, 5)
        start = client.info().revision
        stream = admin.watch(0)
        box: list[Event] = []
        t = threading.Thread(target=lambda: box.append(next(stream)), daemon=True)
        t.start()
        wait_until(lambda: client.info().sessions == 1, 2)
        s.alloc(1, 5)
        t.join(10)
        stream.close()
        assert [(e.revision, e.kind, list(e.pasids())) for e in box] == [(start + 1, "alloc", [2])]


def test_compacted_revision_is_out_of_range(make_broker: Callable[..., BrokerProcess]) -> None:
    b = make_broker("--event-retention", "100")
    with Client(b.address) as cl, cl.session("busy") as s, Client(b.admin_address) as c:
        for _ in range(700):
            got = s.alloc(1, 100)
            s.free(got[0], got[0])
        assert c.info().revision > 1024 + 100
        with pytest.raises(OutOfRange) as e:
            next(iter(c.watch(1)))
        oldest = e.value.oldest_revision
        assert 1 < oldest <= c.info().revision - 100 + 1
        assert (
            f"revision 1 is compacted; the oldest in the event log is {oldest}" in e.value.message
        )
        stream = c.watch(oldest)
        first = next(stream)
        stream.close()
        assert first.revision == oldest


def test_sigterm_ends_watches_at_once_with_the_revision_to_resume(
    make_broker: Callable[..., BrokerProcess],
) -> None:
    """An open Watch must not hold the drain open until --drain-seconds."""
    b = make_broker("--drain-seconds", "60")
    # No reconnect: the broker is not started again, and a close whose stream the drain
    # ended would wait out the deadline to carry its release to a restart.
    with (
        Client(b.address, reconnect_deadline_seconds=0) as c,
        c.session("vm") as s,
        Client(b.admin_address) as a,
    ):
        s.alloc()
        stream = a.watch(1)
        assert next(stream).kind == "set_created"
        assert next(stream).kind == "alloc"
        assert b.proc is not None
        b.proc.send_signal(signal.SIGTERM)
        with pytest.raises(Unavailable, match="Watch again from revision 3"):
            next(stream)
        assert b.proc.wait(30) == 0  # well inside the 60 s drain
