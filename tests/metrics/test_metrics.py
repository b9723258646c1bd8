"""The /metrics endpoint of a real broker, scraped over HTTP and read with the official
text parser: names, types, buckets, and that each counter moves with what it counts."""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pasid_client import Client, QuotaExceeded, Session

from broker.metrics import LATENCY_BUCKETS, RECLAIM_REASONS, TOP_CLIENTS, reclaim_reason
from tests.harness import ROOT, BrokerProcess, run_broker_once, wait_until
from tests.metrics.scrape import scrape

# /metrics names tenants on the brokers of these tests (by default only over mutual TLS):
# they read the top clients and holders.
pytestmark = pytest.mark.broker_args("--metrics-tenants", "on")


COUNTERS = {
    "pasid_broker_allocations",
    "pasid_broker_frees",
    "pasid_broker_pasids_allocated",
    "pasid_broker_pasids_freed",
    "pasid_broker_pasids_reclaimed",
    "pasid_broker_sets_reclaimed",
    "pasid_broker_quota_rejections",
    "pasid_broker_sessions_opened",
    "pasid_broker_store_commit_errors",
    "pasid_broker_backend_errors",
}
HISTOGRAMS = {
    "pasid_broker_request_duration_seconds",
    "pasid_broker_store_commit_duration_seconds",
    "pasid_broker_backend_call_duration_seconds",
}
GAUGES = {
    "pasid_broker_ready",
    "pasid_broker_pasids_in_use",
    "pasid_broker_pasids_capacity",
    "pasid_broker_pasids_reserved",
    "pasid_broker_sessions",
    "pasid_broker_sets",
    "pasid_broker_quota_limit_pasids",
    "pasid_broker_top_client_pasids",
    "pasid_broker_sets_by_identity",
    "pasid_broker_top_holder_pasids",
    "pasid_broker_recovery_duration_seconds",
    "pasid_broker_recovery_replayed_pasids",
    "pasid_broker_recovery_sets",
}
# Info metrics: a gauge named *_info, always 1, in the text format Prometheus reads.
INFOS = {"pasid_broker_build_info", "pasid_broker_backend_info"}


def test_names_types_and_buckets_follow_prometheus_conventions(
    broker: BrokerProcess, client: Client
) -> None:
    with client.session("vm") as s:
        s.alloc(count=3)
        s.free()
        client.info()
        m = scrape(broker.metrics_url)
    types = {name: f.type for name, f in m.families.items()}
    for name in COUNTERS:
        assert types.get(name) == "counter", name
        assert any(s.name == name + "_total" for s in m.samples), f"{name}_total missing"
    for name in HISTOGRAMS:
        assert types.get(name) == "histogram", name
    for name in GAUGES:
        assert types.get(name) == "gauge", name
    for name in INFOS:
        assert types.get(name) == "gauge" and m.value(name) == 1.0, name
    assert m.value("pasid_broker_build_info") == 1.0
    # Units in the name, base units only.
    for name in m.names():
        assert not re.search(r"_(ms|milliseconds|us|microseconds)(_|$)", name), name
    # Buckets resolve 50 µs .. 1 s, and no default 5 ms floor.
    les = sorted(
        {
            float(s.labels["le"])
            for s in m.samples
            if s.name == "pasid_broker_request_duration_seconds_bucket"
        }
    )
    assert les[0] == 0.00005 and les[-2] == 1.0 and les[-1] == float("inf")
    assert les[:-1] == sorted(LATENCY_BUCKETS)
    # A stream alloc took well under a second, so it is in a finite bucket.
    assert m.value("pasid_broker_request_duration_seconds_count", rpc="Session/alloc") == 1
    assert m.value("pasid_broker_request_duration_seconds_count", rpc="GetInfo") == 1
    assert (
        m.value("pasid_broker_request_duration_seconds_bucket", rpc="Session/alloc", le="1.0") == 1
    )
    # No per-session label anywhere but on the two bounded top-N gauges: `client` on
    # both, the verified holder's set_id, pid, uid and ns_pid on the top holders.
    top_n = {"pasid_broker_top_client_pasids", "pasid_broker_top_holder_pasids"}
    assert m.value("pasid_broker_top_holder_pasids") == 0  # this test's set, emptied by free
    for s in m.samples:
        assert "session" not in s.labels and "token" not in s.labels, s
        if {"client", "set_id", "pid", "uid", "ns_pid"} & set(s.labels):
            assert s.name in top_n, s


def test_process_families_on_the_brokers_registry(broker: BrokerProcess) -> None:
    # The memory target (RSS) and restarts (start time) are watched through these.
    assert broker.proc is not None
    m = scrape(broker.metrics_url)
    for name in ("process_resident_memory_bytes", "process_start_time_seconds"):
        assert m.families[name].type == "gauge", name
    assert m.families["process_cpu_seconds"].type == "counter"
    with open(f"/proc/{broker.proc.pid}/status") as f:
        rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    # The broker's own process, not the scraper's: same order of magnitude as /proc says.
    assert 0.5 < m.value("process_resident_memory_bytes") / (rss_kb * 1024) < 2
    assert m.value("process_open_fds") >= 3 and m.value("process_max_fds") > 0
    assert m.value("process_start_time_seconds") > 0
    assert m.value("python_info", implementation="CPython") == 1.0


def test_gauges_match_what_the_broker_reports(broker: BrokerProcess, client: Client) -> None:
    with client.session("a") as a, client.session("b", grace_seconds=30) as b:
        a.alloc(count=5)
        b.alloc(count=2)
        info = client.info()
        m = scrape(broker.metrics_url)
        assert m.value("pasid_broker_pasids_in_use") == info.in_use == 7
        assert m.value("pasid_broker_pasids_capacity") == info.capacity
        assert m.value("pasid_broker_pasids_reserved") == info.reserved
        assert m.value("pasid_broker_sessions") == info.sessions == 2
        assert m.value("pasid_broker_sets", state="attached") == 2
        assert m.value("pasid_broker_ready") == 1
        assert m.value("pasid_broker_quota_limit_pasids", quota="set") == info.quotas.per_set
        assert m.value("pasid_broker_top_client_pasids", client="a") == 5
        assert m.value("pasid_broker_top_client_pasids", client="b") == 2
        # b's stream breaks (a cancel, not a release) while its holder, this process,
        # lives: detached, still holding (issue 19)
        b.detach()
    # a's set is released as its `with` ends; b is detached, still holding
    m = wait_until(
        lambda: (s := scrape(broker.metrics_url)).value("pasid_broker_pasids_in_use") == 2 and s,
        what="a's set to be destroyed",
    )
    assert m.value("pasid_broker_sets", state="detached") == 1
    assert m.value("pasid_broker_backend_info", backend="simulator", pasid_bits="20") == 1


def test_counters_move_with_what_they_count(
    make_broker: Callable[..., BrokerProcess],
) -> None:
    # One identity (anonymous) opens every set here: the per-identity quota counts them
    # all, so the global one must be the tighter to be reached.
    b = make_broker(
        "--quota-per-set",
        "5",
        "--quota-per-identity",
        "6",
        "--quota-global",
        "4",
        "--kernel-quota",
        "100",
    )
    with Client(b.address) as c, c.session("x") as x:
        x.alloc(count=4)
        assert x.free(1, 2) == 2
        assert x.free(1, 2) == 0  # nothing of ours there: ok, without a commit
        with pytest.raises(QuotaExceeded) as e:
            x.alloc(count=4)  # the set would hold 6 > 5
        assert e.value.quota == "set"
        with c.session("x2") as x2:
            with pytest.raises(QuotaExceeded) as e:
                x2.alloc(count=5)  # the identity would hold 7 > 6, whatever the name
            assert e.value.quota == "client"
        with c.session("y") as y:
            y.alloc(count=2)  # 4 in use
            with pytest.raises(QuotaExceeded) as e, c.session("z") as z:
                z.alloc(count=2)  # 6 > 4
            assert e.value.quota == "global"
    m = scrape(b.metrics_url)
    assert m.value("pasid_broker_allocations_total", result="ok") == 2
    assert m.value("pasid_broker_allocations_total", result="quota_exceeded") == 3
    for kind in ("set", "client", "global"):
        assert m.value("pasid_broker_quota_rejections_total", quota=kind) == 1, kind
    assert m.value("pasid_broker_quota_rejections_total", quota="kernel") == 0
    assert m.value("pasid_broker_frees_total", result="ok") == 2
    assert m.value("pasid_broker_pasids_allocated_total") == 6
    assert m.value("pasid_broker_pasids_freed_total") == 2
    # x (2 left), x2 (0), y (2), z (0): every set released as its `with` ended
    wait_until(
        lambda: (
            scrape(b.metrics_url).value("pasid_broker_sets_reclaimed_total", reason="client_exit")
            == 4
        ),
        what="4 sets reclaimed",
    )
    m = scrape(b.metrics_url)
    assert m.value("pasid_broker_pasids_reclaimed_total", reason="client_exit") == 4
    assert m.value("pasid_broker_sessions_opened_total", kind="new") == 4
    assert m.value("pasid_broker_pasids_in_use") == 0
    assert m.value("pasid_broker_request_duration_seconds_count", rpc="Session/open") == 4


def test_backend_errors_and_kernel_quota(make_broker: Callable[..., BrokerProcess]) -> None:
    b = make_broker("--kernel-quota", "2")
    with Client(b.address) as c, c.session("vm") as s:
        s.alloc(count=2)
        with pytest.raises(QuotaExceeded) as e:
            s.alloc()
        assert e.value.quota == "kernel"
        m = scrape(b.metrics_url)
    assert m.value("pasid_broker_quota_rejections_total", quota="kernel") == 1
    assert m.value("pasid_broker_backend_errors_total", op="alloc", error="quota_exceeded") == 1
    assert m.value("pasid_broker_backend_errors_total", op="alloc", error="backend") == 0
    # One call per backend call: the batch of 2 is one simulator alloc_many (one run),
    # the refused alloc another (docs/observability.md).
    assert m.value("pasid_broker_backend_call_duration_seconds_count", op="alloc") == 2


def test_reclaims_by_grace_and_restart_and_recovery_figures(
    make_broker: Callable[..., BrokerProcess],
) -> None:
    b = make_broker("--restart-grace", "1")
    # Anonymous sessions (no peer socket, as a TCP client's): bound to stream and grace.
    # A verified holder's set has no grace at all (tests/e2e/test_set_follows_holder.py).
    with Client(b.address, peer_socket="/nonexistent/peer.sock") as c:
        with c.session("short", grace_seconds=1) as s:
            s.alloc(count=2)
        wait_until(
            lambda: (
                scrape(b.metrics_url).value(
                    "pasid_broker_sets_reclaimed_total", reason="grace_expired"
                )
                == 1
            ),
            what="grace expiry",
        )
        held = c.session("held", grace_seconds=2)
        held.alloc(count=3)
        b.kill()  # its client is alive: after the restart the set waits, then is reclaimed
        held.detach()  # and does not come back (a close would release it after the restart)
    b.start()
    m = scrape(b.metrics_url)
    assert m.value("pasid_broker_recovery_sets") == 1
    assert m.value("pasid_broker_recovery_replayed_pasids") == 3
    assert 0 < m.value("pasid_broker_recovery_duration_seconds") < 60
    assert m.value("pasid_broker_sets", state="detached") == 1
    wait_until(
        lambda: (
            scrape(b.metrics_url).value("pasid_broker_sets_reclaimed_total", reason="restart") == 1
        ),
        what="the unresumed set to be reclaimed after the restart",
    )
    assert scrape(b.metrics_url).value("pasid_broker_pasids_in_use") == 0


def test_engine_reasons_map_into_the_bounded_set() -> None:
    # Every reason string the engine and servicer pass for a set's end, read from the
    # source so that a new one cannot silently land in "other".
    src = "".join(p.read_text() for p in sorted((ROOT / "broker" / "engine").glob("*.py")))
    src += (ROOT / "broker" / "service" / "session_stream.py").read_text()
    reasons = set(
        re.findall(
            r"(?:destroy_set|_schedule_reclaim|end_session|reclaim)\([^\"\n]*f?\"([^\"]+)\"", src
        )
    )
    reasons -= {"set_destroyed", "set_reclaimed"}  # the event kind, not a reason
    reasons |= set(re.findall(r"\"(grace expired[^\"]*)\"", src))
    reasons |= set(re.findall(r"f\"(holder process [^\"]*)\"", src))
    assert {
        "client disconnected",
        "grace expired",
        "holder process {h.pid} exited before restart",
        "holder process {sess.pid} exited",
    } <= reasons
    for r in reasons:
        assert reclaim_reason(r) in RECLAIM_REASONS and reclaim_reason(r) != "other", r
    assert reclaim_reason("client disconnected") == "client_exit"
    assert reclaim_reason("grace expired") == "grace_expired"
    assert reclaim_reason("grace expired after restart") == "restart"
    assert reclaim_reason("client exited before restart") == "client_exit"
    assert reclaim_reason("revoked by admin") == "revoke"
    assert reclaim_reason("holder process 4242 exited") == "client_exit"
    assert reclaim_reason("holder process 4242 exited before restart") == "client_exit"
    assert reclaim_reason("something new") == "other"


def test_top_holders_are_bounded(broker: BrokerProcess, client: Client) -> None:
    sessions = [client.session(f"vm{i:02d}") for i in range(TOP_CLIENTS + 3)]
    try:
        for i, s in enumerate(sessions):
            s.alloc(count=i + 1)
        m = scrape(broker.metrics_url)
        top = {
            s.labels["client"]: s.value
            for s in m.samples
            if s.name == "pasid_broker_top_client_pasids"
        }
        assert len(top) == TOP_CLIENTS + 1
        # the largest holders by name, the 3 smallest summed as (other)
        assert top["vm12"] == 13 and "vm00" not in top
        assert top["(other)"] == 1 + 2 + 3
        assert sum(top.values()) == m.value("pasid_broker_pasids_in_use")
    finally:
        for s in sessions:
            s.close()


def test_metrics_off_and_taken_port(
    make_broker: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    b = make_broker("--metrics-address", "off")
    assert '"metrics_url": "off"' in b.read_log()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_broker_once(
            "--db",
            f"{tmp_path}/b.db",
            "--socket",
            f"{tmp_path}/b.sock",
            "--metrics-address",
            f"127.0.0.1:{port}",
        )
    assert r.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in r.stderr
    assert "--metrics-address" in r.stderr


def test_ready_drops_while_draining() -> None:
    """A request in flight at SIGTERM keeps the broker draining (its commit is slowed by
    the test-only fault hook); meanwhile the scrape says ready 0. Slow commits alone do
    not make it 0 here (--slow-commit-seconds 0: off): only the drain does."""
    b = BrokerProcess(
        "--drain-seconds",
        "20",
        "--metrics-address",
        "127.0.0.1:0",
        "--slow-commit-seconds",
        "0",
        env={"PASID_BROKER_TEST_FAULTS": "commit_delay_ms=1500"},
    )
    try:
        b.start()
        url = b.metrics_url
        assert scrape(url).value("pasid_broker_ready") == 1
        # No reconnect: this broker is not started again, and a close whose stream the
        # drain ended would wait out the deadline to carry its release to the restart.
        with Client(b.address, reconnect_deadline_seconds=0) as c, c.session("vm") as s:
            done: list[object] = []
            t = threading.Thread(target=lambda: done.append(s.alloc()), daemon=True)
            t.start()
            time.sleep(0.2)  # the alloc is now waiting for its slow commit
            assert b.proc is not None
            b.proc.send_signal(signal.SIGTERM)
            wait_until(
                lambda: scrape(url).value("pasid_broker_ready") == 0, what="ready 0 while draining"
            )
            t.join(30)
            assert done and done[0] == [1]  # answered before the broker went
        assert b.proc.wait(30) == 0
    finally:
        b.cleanup()


def test_ready_follows_readiness_while_commits_are_slow() -> None:
    """Every commit takes 1.5 s (the test-only fault hook), over --slow-commit-seconds
    0.5: while a session's open is on the writer thread readiness is NOT_SERVING, and the
    scrape says ready 0 with it (PasidBrokerNotReady watches this gauge); once commits
    have been quick for a while (the journal's SLOW_HOLD), both say ready again."""
    b = BrokerProcess(
        "--slow-commit-seconds",
        "0.5",
        env={"PASID_BROKER_TEST_FAULTS": "commit_delay_ms=1500"},
    )
    try:
        b.start()
        url = b.metrics_url
        wait_until(lambda: b.health() == "SERVING", 20, 0.1, "ready")
        assert scrape(url).value("pasid_broker_ready") == 1
        with Client(b.address) as c:
            opened: list[Session] = []
            t = threading.Thread(target=lambda: opened.append(c.session("vm")), daemon=True)
            t.start()  # its open commits, slowly
            wait_until(lambda: b.health() == "NOT_SERVING", 10, 0.02, "not ready: slow")
            assert scrape(url).value("pasid_broker_ready") == 0
            assert b.health("liveness") == "SERVING"
            t.join(30)
            assert opened, "the open was not answered"
            wait_until(lambda: b.health() == "SERVING", 20, 0.1, "ready again")
            assert scrape(url).value("pasid_broker_ready") == 1
            opened[0].close()
    finally:
        b.cleanup()
