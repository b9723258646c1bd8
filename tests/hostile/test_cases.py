"""The hostile cases of issue 11, each against a live broker: precise refusal, state
unchanged, everyone else still served. Speed is compared as ratios within one run."""

from __future__ import annotations

import itertools
import json
import logging
import os
import resource
import sqlite3
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc
from pasid_client import Client, FailedPrecondition, NotFound, PermissionDenied, QuotaExceeded

from broker.logs import TextFormatter
from broker.store.checks import Digest, count_sets_digest, store_digest, store_sets_digest
from tests.harness import BrokerProcess, wait_until
from tests.hostile.common import assert_no_traceback, check_invariants, raw_call, rss_bytes, tenants
from tests.metrics.scrape import scrape

Make = Callable[..., BrokerProcess]


def _open(stub: pb_grpc.PasidBrokerStub, **fields: object) -> grpc.StatusCode:
    """One Session stream that only opens (and ends); the status it ends with."""
    reqs = iter([pb.SessionRequest(tag=1, open=pb.OpenSession(**fields))])  # type: ignore[arg-type]
    try:
        for _ in stub.Session(reqs, timeout=5):
            pass
    except grpc.RpcError as exc:
        _open.details = exc.details()  # type: ignore[attr-defined]
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _rpc_error(fn: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value


# -- 5. integers from the wire --------------------------------------------------------------


def test_pid_beyond_pid_max_is_refused_and_a_stored_one_does_not_stop_recovery(
    make_broker: Make,
) -> None:
    b = make_broker()
    stub = pb_grpc.PasidBrokerStub(grpc.insecure_channel(b.address))
    for pid in (2**32 - 1, 2**31, 4 * 1024 * 1024 + 1):
        assert _open(stub, client="x", pid=pid) is grpc.StatusCode.INVALID_ARGUMENT
        assert "PID_MAX_LIMIT" in _open.details  # type: ignore[attr-defined]
    with Client(b.address) as c:
        t = tenants(c, 1, 5)[0]
        b.stop()
        # A store written before pids were checked (the crash loop): a set whose
        # holder pid does not fit kill(2)'s int.
        con = sqlite3.connect(b.db)
        with con:
            con.execute(
                "INSERT INTO sets (set_id, client, pid, quota, grace_seconds, token_hash,"
                " created_unix) VALUES (99, 'old', ?, 1000, 0, 'x', 0)",
                (2**32 - 1,),
            )
            con.execute("INSERT INTO allocations (pasid, set_id) VALUES (777777, 99)")
            # Such a store was written by the broker itself, so its digest agrees with its
            # rows (issue 22's start-up check refuses an edit that does not: that refusal
            # is tests/store/test_store_checks.py's, not this test's).
            held: dict[int, list[int]] = {}
            for set_id, pasid in con.execute("SELECT set_id, pasid FROM allocations"):
                held.setdefault(set_id, []).append(pasid)
            store_digest(con, Digest.of(held))
            store_sets_digest(con, count_sets_digest(con))
        con.close()
        b.start()  # recovery must not raise OverflowError
        t.resume(c)
        wait_until(lambda: 99 not in {s.set_id for s in Client(b.admin_address).list_sets()}, 60)
        check_invariants(b, [t])
    assert_no_traceback(b)


def test_watch_revision_beyond_int64_is_invalid_argument(broker: BrokerProcess) -> None:
    stub = pb_grpc.PasidBrokerStub(grpc.insecure_channel(broker.admin_address))
    for rev in (2**63, 2**64 - 1):
        req = pb.WatchRequest(from_revision=rev)
        err = _rpc_error(lambda: next(stub.Watch(req, timeout=5)))  # noqa: B023
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, err
        assert "2^63" in err.details() or str(2**63 - 1) in err.details()
    assert broker.health() == "SERVING"
    assert_no_traceback(broker)


def test_unary_alloc_on_a_detached_set_is_refused(broker: BrokerProcess, client: Client) -> None:
    s = client.session("vmm", grace_seconds=60)
    got = s.alloc(1, 100, count=2)
    sid, token = s.session_id, s.token
    s.detach()  # a broken stream detaches it (close() would release it, issue 19)
    with Client(broker.admin_address) as a:
        wait_until(lambda: [v.state for v in a.list_sets()] == ["detached"])
    with pytest.raises(FailedPrecondition, match="detached"):
        client.alloc(sid, token, 1, 100)
    assert sorted(client.list_session(sid, token).pasids()) == got  # unchanged
    assert client.free(sid, token) == 2  # freeing what it holds is still allowed


def test_malformed_requests_are_counted_and_logged_once_per_interval(
    broker: BrokerProcess,
) -> None:
    ch = grpc.insecure_channel(broker.address)
    before = len(broker.read_log())
    t0 = time.monotonic()
    for _ in range(1000):
        assert raw_call(ch, "PasidBroker", "Alloc", "unary_unary", [b"\xff\xff\xff"]) is (
            grpc.StatusCode.INVALID_ARGUMENT
        )
    elapsed = time.monotonic() - t0
    m = scrape(broker.metrics_url)
    assert m.value("pasid_broker_malformed_requests_total", method="Alloc") == 1000
    logged = broker.read_log()[before:]
    lines = [ln for ln in logged.splitlines() if "malformed request" in ln]
    assert 1 <= len(lines) <= 2 + elapsed / 10, lines  # one per peer per 10 s
    assert len(logged) < 4096, f"{len(logged)} bytes of log for 1,000 bad requests"
    assert_no_traceback(broker)


# -- 4. limits --------------------------------------------------------------------------------


def test_client_names_are_bounded_and_listings_stay_usable(broker: BrokerProcess) -> None:
    stub = pb_grpc.PasidBrokerStub(grpc.insecure_channel(broker.address))
    assert _open(stub, client="x" * 2_500_000) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _open(stub, client="x" * 300) is grpc.StatusCode.INVALID_ARGUMENT
    assert "--max-client-name-bytes" in _open.details  # type: ignore[attr-defined]
    assert "256" in _open.details  # type: ignore[attr-defined]
    assert _open(stub, client="vm\n2026-01-01 INFO forged") is grpc.StatusCode.INVALID_ARGUMENT
    # 256 bytes: allowed
    with Client(broker.address) as c, c.session("é" * 128), Client(broker.admin_address) as a:
        assert [s.client for s in a.list_sets()] == ["é" * 128]


def test_text_log_fields_cannot_forge_a_line() -> None:
    rec = logging.makeLogRecord(
        {
            "msg": "session opened %s",
            "args": ("a\nb",),
            "levelname": "INFO",
            "name": "pasid_broker",
            "client": "vm\n2026-01-01 00:00:00,000 INFO pasid_broker: forged",
            "reason": 'a b="c"',
        }
    )
    line = TextFormatter().format(rec)
    assert "\n" not in line
    assert 'client="vm\\n2026' in line and r'reason="a b=\"c\""' in line


def test_count_per_request_is_capped_and_others_are_not_stalled(make_broker: Make) -> None:
    b = make_broker("--quota-per-set", "0")
    with Client(b.address) as c, c.session("victim") as victim, c.session("hog") as hog:
        t0 = time.monotonic()
        with pytest.raises(QuotaExceeded) as e:
            hog.alloc(1, (1 << 20) - 1, count=1_000_000)
        refused_in = time.monotonic() - t0
        assert e.value.quota == "max_pasids_per_request" and e.value.limit == 4096
        assert e.value.reason == "LIMIT_EXCEEDED"

        def max_request_seconds(n: int = 5) -> float:
            """The median time of the largest allowed request (4096 PASIDs) and its free."""
            times = []
            for _ in range(n):
                t = time.perf_counter()
                hog.alloc(1, (1 << 20) - 1, count=4096)
                hog.free()
                times.append(time.perf_counter() - t)
            return sorted(times)[n // 2]

        one_max = max_request_seconds()
        stop = threading.Event()
        hog_requests = itertools.count()

        def hammer() -> None:
            with Client(b.address) as hc, hc.session("hog2") as h:
                while not stop.is_set():
                    h.alloc(1, (1 << 20) - 1, count=4096)  # the largest request allowed
                    h.free()
                    next(hog_requests)

        th = threading.Thread(target=hammer, daemon=True)
        th.start()
        wait_until(lambda: next(hog_requests) > 2, 30, what="the hog to get going")
        waits = []
        for _ in range(100):  # another client's reads beside back-to-back max requests
            t = time.perf_counter()
            victim.list()
            waits.append(time.perf_counter() - t)
        stop.set()
        th.join(30)
        waits.sort()
        p90, worst = waits[89], waits[-1]
        print(
            f"one 4096-PASID alloc+free alone: {one_max * 1000:.1f} ms; another client's"
            f" wait beside them: p90 {p90 * 1000:.1f} ms (ratio {p90 / one_max:.2f}), worst"
            f" {worst * 1000:.1f} ms; a 1M request refused in {refused_in * 1000:.1f} ms"
        )
        # The stall another client sees is bounded by one capped request, not by what a
        # client asks for (the 1M request stalled everyone for 7 s). p90: the
        # machine is shared, and a single worst case measures its noise.
        assert p90 < 3 * one_max
        assert refused_in < one_max
    check_invariants(b, [])


def test_sessions_per_identity_and_open_rate(make_broker: Make) -> None:
    b = make_broker("--max-sessions-per-identity", "3", "--session-open-burst", "1000")
    with Client(b.address) as c:
        held = [c.session(f"s{i}") for i in range(3)]
        with pytest.raises(QuotaExceeded) as e:
            c.session("one too many")
        assert e.value.quota == "max_sessions_per_identity" and e.value.limit == 3
        assert "--max-sessions-per-identity 3" in e.value.message
        # pasid_client did the peer handshake: the identity is this process's uid.
        assert f"identity uid:{os.getuid()}" in e.value.message
        assert c.info().sessions == 3  # state unchanged, GetInfo still served
        # Another identity (anonymous: no handshake) is still served.
        with Client(b.address, peer_socket="/nonexistent") as anon, anon.session("anon"):
            assert c.info().sessions == 4
        held.pop().close()
        wait_until(lambda: c.info().sets == 2, what="the closed session's set to end")
        held.append(c.session("a slot came free"))
        for s in held:
            s.close()
    b2 = make_broker("--session-opens-per-second", "1", "--session-open-burst", "3")
    with Client(b2.address) as c:
        for i in range(3):
            c.session(f"s{i}").close()
        with pytest.raises(QuotaExceeded) as e:
            c.session("too fast")
        assert e.value.quota == "session_opens_per_second"
        time.sleep(1.1)  # the bucket refills at 1 a second
        c.session("later").close()


def test_pipelined_unread_requests_keep_memory_bounded(make_broker: Make) -> None:
    b = make_broker()
    assert b.proc is not None
    sent = itertools.count()
    base = rss_bytes(b.proc.pid)

    def requests() -> Iterator[pb.SessionRequest]:
        yield pb.SessionRequest(tag=0, open=pb.OpenSession(client="pipeliner"))
        for i in range(1, 300_001):
            next(sent)
            yield pb.SessionRequest(tag=i, list=pb.ListRequest())

    ch = grpc.insecure_channel(b.address)
    call = pb_grpc.PasidBrokerStub(ch).Session(requests())  # replies never read
    last = -1
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the client is held back, or all is sent
        time.sleep(1.0)
        now = next(sent)
        if now == last or now >= 300_000:
            break
        last = now
    grown = rss_bytes(b.proc.pid) - base
    with Client(b.address) as other:  # everyone else is still served
        assert other.info().sessions == 1
        with other.session("other") as s:
            s.alloc()
    call.cancel()
    ch.close()
    print(f"{last} requests sent unread; broker RSS grew {grown / 2**20:.1f} MB")
    assert grown < 64 * 2**20, f"RSS grew {grown / 2**20:.0f} MB (unbounded buffering?)"


def test_watchers_are_limited_and_a_thousand_do_not_slow_others(make_broker: Make) -> None:
    """1,000 watchers (the limit) are admitted and the next is refused naming the limit;
    meanwhile another tenant's alloc+free rate stays above half of a baseline's. The
    baseline is a twin broker without watchers, measured in the same rounds, alternately
    (a shared machine's load falls on both alike); the median of the rounds' ratios is
    what is compared."""
    flags = (
        *("--max-watchers", "1000", "--max-watchers-per-identity", "1000"),
        *("--max-watchers-anonymous", "1000"),  # these watchers are stock, anonymous
    )
    b, twin = make_broker(*flags), make_broker(*flags)
    with (
        Client(b.address) as c,
        c.session("quiet") as quiet,
        c.session("busy") as busy,
        Client(twin.address) as tc,
        tc.session("busy") as twin_busy,
    ):

        def rate(s: object, n: int = 50) -> float:
            """alloc+free per second on session `s`."""
            t = time.perf_counter()
            for _ in range(n):
                p = s.alloc(1, 1000)  # type: ignore[attr-defined]
                s.free(p[0], p[0])  # type: ignore[attr-defined]
            return n / (time.perf_counter() - t)

        rate(busy), rate(twin_busy)  # warm both up alike
        main = grpc.insecure_channel(b.address)
        admin = grpc.insecure_channel(b.admin_address)
        stubs = pb_grpc.PasidBrokerStub(main), pb_grpc.PasidBrokerStub(admin)
        ref = pb.SessionRef(session_id=quiet.session_id, token=quiet.token)
        # 1,000 tenants' watchers of their own set (the issue's case: Watch on the
        # clients' socket), 20 of them replaying from revision 1 and never reading.
        calls = [stubs[0].Watch(pb.WatchRequest(session=ref)) for _ in range(980)]
        calls += [stubs[0].Watch(pb.WatchRequest(session=ref, from_revision=1)) for _ in range(20)]
        # All 1,000 are open (the broker's gauge says so); the next one is refused,
        # naming the limit.
        wait_until(
            lambda: scrape(b.metrics_url).value("pasid_broker_watchers") == 1000,
            60,
            0.2,
            "1,000 watchers to be open",
        )
        err = _rpc_error(lambda: next(stubs[0].Watch(pb.WatchRequest(session=ref), timeout=10)))
        assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-watchers 1000" in err.details()
        ratios = []
        for i in range(15):  # which goes first alternates too
            if i % 2:
                alone, watched = rate(twin_busy), rate(busy)
            else:
                watched, alone = rate(busy), rate(twin_busy)
            ratios.append(watched / alone)
        quiet.alloc()  # a tenant's watcher sees its own set's event
        assert next(calls[0]).set_id == quiet.set_id
        ratio = statistics.median(ratios)
        print(
            "ops/s with 1,000 watchers / without (twin broker, same rounds): median"
            f" {ratio:.2f}, rounds {' '.join(f'{r:.2f}' for r in ratios)}"
        )
        assert ratio > 0.5, ratios
        for call in calls:
            call.cancel()
        main.close()
        admin.close()


def test_a_watcher_fallen_behind_is_cut_off_with_the_revision_to_resume(
    make_broker: Make,
) -> None:
    b = make_broker("--watch-buffer", "50")
    with Client(b.address) as c, c.session("busy") as s, Client(b.admin_address) as a:
        start = c.info().revision
        # A watcher that stops reading: the broker's generator stalls on flow control
        # once the transport is full, while events keep coming.
        opts = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
        slow_ch = grpc.insecure_channel(b.address, options=opts)
        ref = pb.SessionRef(session_id=s.session_id, token=s.token)  # its own set's events
        slow = pb_grpc.PasidBrokerStub(slow_ch).Watch(
            pb.WatchRequest(from_revision=start + 1, session=ref)
        )
        fast = a.watch(start + 1)
        for _ in range(2000):  # 4,000 events, 40 times the buffer
            got = s.alloc(1, 1000, count=64)
            s.free(got[0], got[-1])
        final = c.info().revision
        seen = [next(fast).revision for _ in range(final - start)]
        assert seen == list(range(start + 1, final + 1))  # the fast one is whole
        fast.close()
        revs: list[int] = []
        with pytest.raises(grpc.RpcError) as e:
            for ev in slow:
                revs.append(ev.revision)
        slow_ch.close()
    if e.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED:  # pragma: no cover
        pytest.skip("the transport buffered every event: nothing fell behind")
    assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, e.value
    resume = revs[-1] + 1 if revs else start + 1
    assert f"Watch again from revision {resume}" in e.value.details()
    assert revs == list(range(start + 1, resume))  # no gap before the cut


def test_watch_on_the_clients_socket_shows_only_the_callers_set(broker: BrokerProcess) -> None:
    with Client(broker.address) as c, c.session("a") as a, c.session("b") as b:
        a.alloc()
        b.alloc()
        b.alloc()
        # An anonymous caller (no peer handshake) is no admin: its own set only. (This
        # test runs as root, so pasid_client's own ticket would make it an admin.)
        with (
            Client(broker.address, peer_socket="/nonexistent") as anon,
            pytest.raises(PermissionDenied, match="admin call"),
        ):
            next(iter(anon.watch(1)))
        assert next(iter(c.watch(1))).revision == 1  # uid 0: an admin sees every set
        with pytest.raises(NotFound):
            next(iter(c.watch(1, session_id=b.session_id, token=a.token)))
        stream = c.watch(1, session_id=a.session_id, token=a.token)
        first_two = [next(stream), next(stream)]
        a.alloc()
        third = next(stream)
        stream.close()
        assert [(e.set_id, e.kind) for e in [*first_two, third]] == [
            (a.set_id, "set_created"),
            (a.set_id, "alloc"),
            (a.set_id, "alloc"),
        ]


def test_descriptor_limit_is_raised_to_the_hard_limit(broker: BrokerProcess) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    serving = [json.loads(ln) for ln in broker.read_log().splitlines() if '"serving"' in ln]
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    assert serving[-1]["nofile"] == want
