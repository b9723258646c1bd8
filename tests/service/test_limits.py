"""The limits' bookkeeping and the Watch log, in-process (the e2e side is tests/hostile).

EventFanout is driven without a store: a Watch from "now" (revision 0) never reads it.
"""

from __future__ import annotations

import asyncio

import pytest

from broker.core import LimitExceeded
from broker.core.rate import TokenBucket
from broker.engine.events import EventFanout
from broker.service.limits import Admission, Limits
from broker.store import Event


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    b = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.take(0.5)  # one token back after 1/rate
    assert not b.take(0.5)


def test_admission_counts_sessions_until_their_set_is_destroyed() -> None:
    now = [0.0]
    adm = Admission(Limits(max_sessions_per_identity=2, session_open_burst=100), lambda: now[0])
    adm.admit_open("uid:1", True)
    adm.opened(10, "uid:1")
    adm.admit_open("uid:1", True)
    adm.open_failed("uid:1")  # its commit failed: the slot comes back
    adm.admit_open("uid:1", True)
    adm.opened(11, "uid:1")
    with pytest.raises(LimitExceeded) as e:
        adm.admit_open("uid:1", True)
    assert (e.value.kind, e.value.limit) == ("max_sessions_per_identity", 2)
    adm.admit_open("uid:2", True)  # another identity is still served
    adm.admit_open("uid:1", False)  # a resume holds no new slot
    adm.set_destroyed(10, "client disconnected", "set_destroyed", 0)
    adm.admit_open("uid:1", True)
    assert adm.sessions_of("uid:1") == 2


def test_admission_limits_watchers_in_all_and_per_identity() -> None:
    adm = Admission(Limits(max_watchers=3, max_watchers_per_identity=2))
    with adm.watching("a"), adm.watching("a"):
        with pytest.raises(LimitExceeded, match="max-watchers-per-identity 2"):
            adm.watching("a").__enter__()
        with adm.watching("b"), pytest.raises(LimitExceeded, match="--max-watchers 3"):
            adm.watching("c").__enter__()
    assert adm.watchers == 0


def test_anonymous_watchers_have_their_own_smaller_share() -> None:
    adm = Admission(Limits(max_watchers_per_identity=2, max_watchers_anonymous=1))
    with adm.watching("anonymous"), adm.watching("uid:5"), adm.watching("uid:5"):
        with pytest.raises(LimitExceeded, match="--max-watchers-anonymous 1") as e:
            adm.watching("anonymous").__enter__()
        assert e.value.kind == "max_watchers_anonymous"
    assert adm.watchers == 0


def _ev(rev: int, set_id: int = 1) -> Event:
    return Event(rev, 0.0, "alloc", set_id, (rev,))


def test_watch_log_keeps_a_bounded_buffer_and_cuts_off_a_watcher_fallen_behind() -> None:
    async def run() -> None:
        fan = EventFanout(store=None, buffer=10)  # type: ignore[arg-type]
        fast, slow = fan.watch(0), fan.watch(0)
        nxt_fast = asyncio.ensure_future(anext(fast))
        nxt_slow = asyncio.ensure_future(anext(slow))
        await asyncio.sleep(0)
        fan.publish([_ev(1)])
        assert (await nxt_fast).revision == 1 and (await nxt_slow).revision == 1
        for r in range(2, 40):  # the slow one reads nothing meanwhile
            fan.publish([_ev(r)])
            assert (await anext(fast)).revision == r
        assert len(fan._log) < 2 * fan.buffer  # trimmed, whatever the slow one did
        with pytest.raises(LimitExceeded, match="Watch again from revision 2"):
            await anext(slow)

    asyncio.run(run())


def test_a_set_watcher_is_woken_only_by_its_own_sets_events() -> None:
    async def run() -> None:
        fan = EventFanout(store=None)  # type: ignore[arg-type]
        mine = fan.watch(0, set_id=7)
        got = asyncio.ensure_future(anext(mine))
        await asyncio.sleep(0)
        fan.publish([_ev(1, set_id=8), _ev(2, set_id=9)])
        await asyncio.sleep(0)
        assert not got.done() and set(fan._wake_set) == {7}
        fan.publish([_ev(3, set_id=7)])
        assert (await got).revision == 3
        fan.end_watches()
        with pytest.raises(Exception, match="shutting down"):
            await anext(mine)

    asyncio.run(run())


def test_fanout_gate_bounds_senders_and_their_share_of_time_under_contention() -> None:
    """Issue 20, point 6: up to `slots` watchers send freely; beyond them, sending takes
    at most `share` of the time, so 512 watchers lag instead of delaying requests."""
    from broker.engine.events import FanoutGate

    now = [0.0]

    async def run() -> None:
        gate = FanoutGate(slots=2, lease=60.0, share=0.25, burst=0.0, clock=lambda: now[0])
        a, b = await gate.acquire(), await gate.acquire()
        third = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0)
        assert not third.done()  # both slots taken: it waits, in order
        now[0] += 1.0  # one contended second of sending: a debt of 0.75 s
        gate.release(a)
        c = await third
        gate.release(b)
        gate.release(c)
        assert gate._account() == pytest.approx(-0.75)
        later = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0.01)
        assert not later.done()  # over the share: it waits the debt out (3 s at 25 %)
        now[0] += 3.0
        await asyncio.wait_for(later, 5)  # paid back: served

    asyncio.run(run())


def test_log_throttle_bounds_lines_per_peer_and_in_all() -> None:
    """Issue 20, point 5: a burst per peer, then its rate; a cap over all peers; the next
    line says how many were held back. Fields are clipped, saying by how much."""
    from broker.logs import LogThrottle, clip

    now = [0.0]
    t = LogThrottle(burst=2, interval=10.0, total=2, clock=lambda: now[0])
    assert [t.allow("a"), t.allow("a"), t.allow("a"), t.allow("a")] == [0, 0, None, None]
    assert [t.allow("b"), t.allow("b"), t.allow("c")] == [0, 0, None]  # 4 in all: the cap
    now[0] += 5.0  # a's bucket: one line back (2 per 10 s); the cap: two
    assert t.allow("a") == 2  # the two held back are counted
    assert clip("x" * 300) == "x" * 256 + "...[44 more chars]"
    assert clip("short") == "short"
