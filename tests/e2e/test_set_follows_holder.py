"""A set follows its holder process (issue 19), with real processes: a sidecar killed
while its VMM lives, streams cancelled or broken versus released or half-closed, and
broker restarts (kill -9 and SIGTERM) with many holders, some frozen, some delegated,
some dying while the broker is down. The rule is broker/engine/lifecycle.py's table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import grpc
import pytest
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc
from pasid_client import Client, FailedPrecondition, NotFound
from pasid_client.handshake import obtain_ticket

from tests.e2e.test_peer_sessions import event_of, events, holder, read, sets, start
from tests.harness import BrokerProcess, assert_memory_matches_disk, db_holdings, wait_until
from tests.metrics.scrape import scrape

PASIDCTL = [sys.executable, "-m", "pasid_client.cli"]

# A pasidctl run to its end: its output as text, failing the test on a non-zero exit.
RUN: dict[str, Any] = {"capture_output": True, "text": True, "timeout": 60, "check": True}

# The longest grace any set may have on these brokers: a detached verified set must
# outlive it (no timer applies to it at all).
LONGEST = 1


@pytest.fixture
def b(make_broker: Any) -> BrokerProcess:
    out: BrokerProcess = make_broker("--max-grace", str(LONGEST), "--restart-grace", str(LONGEST))
    return out


def peer_sock(b: BrokerProcess) -> str:
    return os.path.join(b.dir, "peer.sock")


def raw_session(
    b: BrokerProcess, **open_fields: Any
) -> tuple[grpc.Channel, Any, list[pb.SessionRequest | None], pb.SessionOpened]:
    """A Session on a plain stub whose requests the test feeds (None: half-close)."""
    import queue

    q: queue.SimpleQueue[pb.SessionRequest | None] = queue.SimpleQueue()
    q.put(pb.SessionRequest(tag=0, open=pb.OpenSession(client="raw", **open_fields)))
    ch = grpc.insecure_channel(b.address)
    call = pb_grpc.PasidBrokerStub(ch).Session(iter(q.get, None))
    opened = next(call).opened
    feed: Any = q
    return ch, call, feed, opened


# -- a stream that breaks detaches; its holder's exit destroys ----------------------------


@pytest.mark.parametrize("grace", [0, LONGEST])
def test_killed_sidecar_detaches_the_vmms_set_until_the_vmm_exits(
    b: BrokerProcess, procs: list[subprocess.Popen[str]], grace: int
) -> None:
    vmm = start(procs, ["sleep", "120"])
    ans, sidecar = holder(procs, b.address, "--delegate-pid", str(vmm.pid), "--grace", str(grace))
    set_id = ans["session_id"]
    sidecar.kill()  # SIGKILL: no release, the connection just breaks
    sidecar.wait()
    wait_until(lambda: sets(b)[set_id].state == "detached", what="the set detached")
    time.sleep(LONGEST + 1.5)  # past the longest grace the broker allows
    view = sets(b)[set_id]
    assert view.state == "detached" and view.pid == vmm.pid and view.count == 3
    assert db_holdings(b.db)[set_id] == ans["pasids"]
    m = scrape(b.metrics_url)
    assert m.value("pasid_broker_detached_verified_sets") == 1
    assert m.value("pasid_broker_sets", state="detached") == 1
    assert m.value("pasid_broker_detached_oldest_seconds") >= LONGEST + 1
    assert event_of(b, "set_detached", set_id).reason == "client disconnected"
    t0 = time.monotonic()
    vmm.kill()
    wait_until(lambda: set_id not in sets(b), 5, 0.01, "the set gone with the VMM")
    took = time.monotonic() - t0
    assert took < 1.0, f"the set outlived its VMM by {took:.3f} s"
    assert event_of(b, "set_reclaimed", set_id).reason == f"holder process {vmm.pid} exited"
    assert scrape(b.metrics_url).value("pasid_broker_detached_oldest_seconds") == 0
    assert_memory_matches_disk(b)


def test_cancelled_stream_of_a_live_holder_detaches_not_destroys(b: BrokerProcess) -> None:
    """A cancel (the holder lives: this very process) is not a release."""
    ticket = obtain_ticket(peer_sock(b))
    ch, call, q, opened = raw_session(b, ticket=ticket.ticket)
    q.put(pb.SessionRequest(tag=1, alloc=pb.AllocRequest(min=1, max=100, count=2)))
    assert list(next(call).alloc.pasids) == [1, 2]
    call.cancel()
    ch.close()
    wait_until(lambda: sets(b)[opened.set_id].state == "detached", what="detached")
    time.sleep(LONGEST + 1.0)
    assert sets(b)[opened.set_id].count == 2


def test_half_close_releases_the_set_and_is_answered(b: BrokerProcess) -> None:
    ticket = obtain_ticket(peer_sock(b))
    ch, call, q, opened = raw_session(b, ticket=ticket.ticket)
    q.put(pb.SessionRequest(tag=1, alloc=pb.AllocRequest(min=1, max=100, count=2)))
    assert list(next(call).alloc.pasids) == [1, 2]
    q.put(None)  # half-close: the client is done
    rest = list(call)  # the broker answers the half-close, then ends the stream OK
    assert [(r.tag, r.WhichOneof("result"), r.release.freed) for r in rest] == [(0, "release", 2)]
    assert call.code() is grpc.StatusCode.OK
    ch.close()
    assert opened.set_id not in sets(b)
    assert event_of(b, "set_destroyed", opened.set_id).reason.startswith("client released")
    assert_memory_matches_disk(b)


def test_release_request_destroys_the_set_whatever_its_grace(b: BrokerProcess) -> None:
    ticket = obtain_ticket(peer_sock(b))
    ch, call, q, opened = raw_session(b, ticket=ticket.ticket, grace_seconds=LONGEST)
    q.put(pb.SessionRequest(tag=1, alloc=pb.AllocRequest(min=1, max=100, count=3)))
    next(call)
    q.put(pb.SessionRequest(tag=2, release=pb.ReleaseRequest()))
    resp = next(call)
    assert (resp.tag, resp.release.freed) == (2, 3)
    assert list(call) == [] and call.code() is grpc.StatusCode.OK
    ch.close()
    assert opened.set_id not in sets(b) and not db_holdings(b.db)


def test_library_with_exit_releases(b: BrokerProcess) -> None:
    with Client(b.address) as c:
        with c.session("with") as s:
            s.alloc(1, 100, 2)
            set_id = s.set_id
        assert set_id not in sets(b)
    assert not db_holdings(b.db)


def test_anonymous_set_keeps_the_stream_plus_grace_rule(b: BrokerProcess) -> None:
    ch, call, q, opened = raw_session(b, grace_seconds=LONGEST)  # no ticket: anonymous
    assert not opened.verified
    q.put(pb.SessionRequest(tag=1, alloc=pb.AllocRequest(min=1, max=100, count=1)))
    next(call)  # the open's reply certainly counted as received: this is no abandoned open
    call.cancel()
    ch.close()
    wait_until(lambda: sets(b).get(opened.set_id) is None, LONGEST + 5, 0.05, "grace over")
    ev = event_of(b, "set_reclaimed", opened.set_id)
    assert ev.reason == "grace expired"


# -- pasidctl hold: Ctrl-C releases, SIGTERM (a sidecar's restart) detaches ---------------


def test_pasidctl_hold_ctrl_c_releases_sigterm_detaches(
    b: BrokerProcess, procs: list[subprocess.Popen[str]]
) -> None:
    vmm = start(procs, ["sleep", "120"])
    ctl = [sys.executable, "-m", "pasid_client.cli", "--socket", b.socket]
    hold = [*ctl, "hold", "--json", "--count", "2", "--delegate-pid", str(vmm.pid)]
    h1 = start(procs, hold)
    first = read(h1)["session_id"]
    h1.send_signal(signal.SIGINT)
    assert h1.wait(10) == 0
    assert first not in sets(b)
    h2 = start(procs, hold)
    second = read(h2)["session_id"]
    h2.send_signal(signal.SIGTERM)  # what a kubelet sends a sidecar it restarts
    assert h2.wait(10) == 0
    wait_until(lambda: sets(b)[second].state == "detached", what="detached")
    vmm.kill()
    wait_until(lambda: not sets(b), 5, 0.02, "the set gone with the VMM")


# -- broker restarts: every live holder keeps exactly its set -----------------------------


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_restart_keeps_every_live_holders_set_and_only_those(
    b: BrokerProcess, procs: list[subprocess.Popen[str]], how: str
) -> None:
    """50 holders: 40 VMMs (`sleep`) delegated by one sidecar process, 10 clients holding
    their own sets; some frozen (SIGSTOP) across the restart, some killed while the broker
    is down. Afterwards, and still after the longest grace: every live holder has exactly
    its set, with exactly its PASIDs; the dead ones' sets are gone; no PASID is in two
    sets; memory matches the file."""
    vmms = [start(procs, ["sleep", "300"]) for _ in range(40)]
    side = start(
        procs,
        [sys.executable, "-m", "tests.e2e.sidecar", b.address, *(str(v.pid) for v in vmms)],
    )
    delegated = {int(pid): v for pid, v in read(side).items()}
    own = [holder(procs, b.address, "--count", "2") for _ in range(10)]
    want: dict[int, list[int]] = {v["set_id"]: v["pasids"] for v in delegated.values()}
    want |= {ans["session_id"]: ans["pasids"] for ans, _ in own}
    assert len(want) == 50 and db_holdings(b.db) == want
    # and a running `pasidctl hold` (its own holder): still running, and attached again
    # by itself, after the restart
    ctl = start(procs, [*PASIDCTL, "--socket", b.socket, "hold", "--json", "--count", "2"])
    ctl_held = read(ctl)
    ctl_set, ctl_pasids = ctl_held["session_id"], ctl_held["pasids"]

    frozen = [*vmms[:5], *(p for _, p in own[:3])]
    for p in frozen:
        p.send_signal(signal.SIGSTOP)
    if how == "kill -9":
        b.kill()
    else:
        assert b.stop() == 0
    dying = [*vmms[5:12], *(p for _, p in own[3:6])]
    for p in dying:
        p.kill()
        p.wait(10)
    gone = {delegated[p.pid]["set_id"] for p in vmms[5:12]}  # type: ignore[misc]
    gone |= {ans["session_id"] for ans, _ in own[3:6]}
    b.start()
    live = {k: v for k, v in want.items() if k not in gone}
    assert len(live) == 40

    def check() -> None:
        # The dead holders' sets leave memory at recovery; their destroys are durable a
        # moment later (the commit is asynchronous): wait for the file to say so too.
        everyone = live | {ctl_set: ctl_pasids}
        wait_until(lambda: db_holdings(b.db) == everyone, 10, 0.05, "the dead holders' sets gone")
        wait_until(lambda: sets(b)[ctl_set].state == "attached", 30, 0.05, "pasidctl hold back")
        assert ctl.poll() is None, "pasidctl hold exited"
        views = sets(b)
        mine = views.pop(ctl_set)
        assert (sorted(mine.pasids()), mine.pid) == (ctl_pasids, ctl.pid)
        assert {k: sorted(v.pasids()) for k, v in views.items()} == live
        holders = {v.set_id: v.pid for v in views.values()}
        for pid, d in delegated.items():
            if d["set_id"] in live:
                assert holders[d["set_id"]] == pid  # type: ignore[index]
        assert all(v.state == "detached" for v in views.values())
        everything = [p for v in views.values() for p in v.pasids()]
        assert len(everything) == len(set(everything)) == 80, "a PASID in two sets"
        assert not set(everything) & set(ctl_pasids), "a PASID in two sets"
        assert assert_memory_matches_disk(b) == everyone

    check()
    time.sleep(LONGEST + 1.5)  # no restart grace applies to a live verified holder
    check()
    for p in frozen:  # thawed, still theirs; then their exit ends them
        p.send_signal(signal.SIGCONT)
    for v in vmms:
        if v.poll() is None:
            v.kill()
    wait_until(
        lambda: set(sets(b)) == {ans["session_id"] for ans, _ in own[:3] + own[6:]} | {ctl_set},
        5,
        0.02,
        "the VMMs' sets gone with them",
    )


def _detached_delegated_set(
    b: BrokerProcess, procs: list[subprocess.Popen[str]]
) -> tuple[subprocess.Popen[str], int]:
    """A set held by a sidecar for a live VMM (a sleep), detached by the sidecar's
    SIGKILL (no release: the connection just breaks), once `pasidctl sets` shows it
    detached: (the VMM, which lives on in `procs`, the set's id)."""
    vmm = start(procs, ["sleep", "120"])
    ans, sidecar = holder(procs, b.address, "--delegate-pid", str(vmm.pid))
    set_id: int = ans["session_id"]
    sidecar.kill()
    sidecar.wait()
    wait_until(lambda: sets(b)[set_id].state == "detached", what="the set detached")
    return vmm, set_id


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill9", "sigterm"])
def test_a_detached_sets_age_outlives_broker_restarts(
    b: BrokerProcess, procs: list[subprocess.Popen[str]], sig: int
) -> None:
    """sets.detached_unix is stored: `pasidctl sets` and the PasidSetDetachedLong alert
    see how long a set has really been detached, not the time since the last restart."""
    _, set_id = _detached_delegated_set(b, procs)
    since = sets(b)[set_id].detached_unix
    assert 0 < since <= time.time()
    for _ in range(2):  # a second restart must not reset it either
        time.sleep(0.5)
        b.kill(sig)
        b.start()
        view = sets(b)[set_id]
        assert view.state == "detached"
        assert view.detached_unix == pytest.approx(since, abs=1e-3)


# -- re-attach without a token --------------------------------------------------------------


def test_restarted_sidecar_reattaches_the_vmms_set(
    b: BrokerProcess, procs: list[subprocess.Popen[str]]
) -> None:
    """A kubelet restarts the sidecar with the same command line: `pasidctl hold
    --delegate-pid P` finds P's detached set and takes it back, PASIDs and all."""
    vmm = start(procs, ["sleep", "120"])
    ctl = [sys.executable, "-m", "pasid_client.cli", "--socket", b.socket]
    hold = [*ctl, "hold", "--json", "--count", "3", "--delegate-pid", str(vmm.pid)]
    first = start(procs, hold)
    ans = read(first)
    first.kill()
    first.wait()
    wait_until(lambda: sets(b)[ans["session_id"]].state == "detached", what="detached")
    with Client(b.address) as c:
        [listed] = c.held_sets(delegate_pid=vmm.pid)
        assert (listed.set_id, listed.state) == (ans["session_id"], "detached")
        assert listed.detached_unix > 0
    again = start(procs, hold)
    ans2 = read(again)
    assert (ans2["session_id"], ans2["pasids"]) == (ans["session_id"], ans["pasids"])
    assert ans2["token"] == ""  # no token travels on a re-attach
    view = sets(b)[ans["session_id"]]
    assert view.state == "attached" and view.pid == vmm.pid and view.count == 3
    assert view.detached_unix == 0
    # Watch saw it go and come back (a tenant watching its own set sees the same)
    event_of(b, "set_detached", ans["session_id"])
    assert event_of(b, "set_reattached", ans["session_id"]).reason.startswith("detached for")
    again.send_signal(signal.SIGINT)  # Ctrl-C: the explicit release
    assert again.wait(10) == 0
    assert not sets(b) and not db_holdings(b.db)


def test_reattach_only_by_the_holder_and_only_when_detached(
    b: BrokerProcess, procs: list[subprocess.Popen[str]]
) -> None:
    vmm = start(procs, ["sleep", "120"])
    other = start(procs, ["sleep", "120"])
    ans, sidecar = holder(procs, b.address, "--delegate-pid", str(vmm.pid))
    set_id = ans["session_id"]
    with Client(b.address) as c:
        # attached to the sidecar's stream: the holder's own re-attach is a conflict
        with pytest.raises(FailedPrecondition):
            c.session(reattach_set_id=set_id, delegate_pid=vmm.pid)
        sidecar.kill()
        sidecar.wait()
        wait_until(lambda: sets(b)[set_id].state == "detached", what="detached")
        for who in ({"delegate_pid": other.pid}, {}):  # another process; this one
            with pytest.raises(NotFound):
                c.session(reattach_set_id=set_id, **who)  # type: ignore[arg-type]
        with pytest.raises(NotFound):
            c.session(reattach_set_id=set_id + 100, delegate_pid=vmm.pid)
        assert c.held_sets(delegate_pid=other.pid) == []
        assert sets(b)[set_id].state == "detached"  # nothing changed
        with c.session(reattach_set_id=set_id, delegate_pid=vmm.pid) as s:
            assert (s.set_id, s.resumed, s.list().count) == (set_id, True, 3)
    assert set_id not in sets(b)  # the `with` exit released it


def test_an_anonymous_set_is_not_reattached_by_a_ticket(b: BrokerProcess) -> None:
    ch, call, _q, opened = raw_session(b, grace_seconds=LONGEST)
    call.cancel()
    ch.close()
    with Client(b.address) as c, pytest.raises(NotFound):
        c.session(reattach_set_id=opened.set_id)


# -- tickets: a dead process's count for nothing; a refused open gives its ticket back -----


def test_tickets_of_a_process_that_exited_lock_nobody_out(b: BrokerProcess) -> None:
    flood = (
        "import sys\n"
        "from pasid_client.handshake import obtain_ticket\n"
        "for _ in range(1024):\n"
        "    obtain_ticket(sys.argv[1])\n"
    )
    r = subprocess.run([sys.executable, "-c", flood, peer_sock(b)], timeout=120)
    assert r.returncode == 0  # 1024 unused tickets, the most a uid may hold; then exited
    with Client(b.address) as c, c.session("after-the-flood") as s:
        assert s.verified


def test_an_open_refused_gives_its_ticket_back(b: BrokerProcess) -> None:
    from tests.e2e.test_peer_sessions import open_raw

    t = obtain_ticket(peer_sock(b))
    err = open_raw(b.address, ticket=t.ticket, pid=1)  # a false claim: refused
    assert isinstance(err, grpc.RpcError) and err.code() is grpc.StatusCode.INVALID_ARGUMENT
    err = open_raw(b.address, ticket=t.ticket, reattach_set_id=99)  # no such set of ours
    assert isinstance(err, grpc.RpcError) and err.code() is grpc.StatusCode.NOT_FOUND
    opened = open_raw(b.address, ticket=t.ticket)  # the same ticket, still good
    assert isinstance(opened, pb.SessionOpened) and opened.verified
    err = open_raw(b.address, ticket=t.ticket)  # and used up by the open that succeeded
    assert isinstance(err, grpc.RpcError) and "already used" in (err.details() or "")


def test_a_killed_holder_is_its_exit_not_a_detach(
    b: BrokerProcess, procs: list[subprocess.Popen[str]]
) -> None:
    """A client holding its own set is SIGKILLed: its stream breaks and its pidfd fires
    at nearly the same instant; whichever the broker sees first, the set goes at once,
    as the holder's exit."""
    held = [holder(procs, b.address) for _ in range(5)]
    t0 = time.monotonic()
    for _, p in held:
        p.kill()
    wait_until(lambda: not sets(b), 5, 0.01, "every killed holder's set gone")
    took = time.monotonic() - t0
    assert took < 1.0, f"sets outlived their holders by {took:.3f} s"
    for ans, p in held:
        ev = event_of(b, "set_reclaimed", ans["session_id"])
        assert ev.reason == f"holder process {p.pid} exited"
    assert_memory_matches_disk(b)


FILL_FDS = (
    "import sys\n"
    "from pasid_client.handshake import obtain_ticket\n"
    "tickets = [obtain_ticket(sys.argv[1]) for _ in range(int(sys.argv[2]))]\n"
    "print('{}', flush=True)\n"
    "sys.stdin.read()\n"
)


def test_a_live_holder_is_told_from_a_dead_one_past_1024_fds(
    b: BrokerProcess, procs: list[subprocess.Popen[str]]
) -> None:
    """A busy broker holds a pidfd per holder and per ticket, so new ones are numbered
    past FD_SETSIZE (1024), where select(2) fails: that failure was taken for the
    holder's exit, and a live VMM's set was destroyed when its sidecar was killed."""
    # A live process holding 1000 unused tickets (under the uid's 1024): each keeps a
    # pidfd open in the broker, so the sidecar's handshake gets a pidfd past 1024.
    read(start(procs, [sys.executable, "-c", FILL_FDS, peer_sock(b), "1000"]))
    assert b.proc is not None
    assert max(int(fd) for fd in os.listdir(f"/proc/{b.proc.pid}/fd")) >= 1024
    vmm = start(procs, ["sleep", "120"])
    ans, sidecar = holder(procs, b.address, "--delegate-pid", str(vmm.pid))
    set_id = ans["session_id"]
    sidecar.kill()
    sidecar.wait()
    wait_until(lambda: set_id not in sets(b) or sets(b)[set_id].state == "detached")
    view = sets(b).get(set_id)
    assert view is not None and view.state == "detached", "a live VMM's set was destroyed"
    assert db_holdings(b.db)[set_id] == ans["pasids"]
    vmm.kill()
    wait_until(lambda: set_id not in sets(b), 5, 0.01, "the set gone with the VMM")
    assert event_of(b, "set_reclaimed", set_id).reason == f"holder process {vmm.pid} exited"


# -- what users see: sets, list and the metrics show detached sets and for how long --------


def test_sets_and_list_show_detached_sets_and_for_how_long(
    b: BrokerProcess, procs: list[subprocess.Popen[str]]
) -> None:
    """`pasidctl sets` and `list --all`, as text and --json, show a detached set's state
    and how long it has been detached (docs/observability.md): the DETACHED column, and
    `detached_unix` with `detached_seconds` in JSON; an attached one shows "-" and 0.
    The age is the stored one, so it goes on counting across a broker restart."""
    vmm, detached = _detached_delegated_set(b, procs)
    time.sleep(1.5)
    b.kill()
    b.start()
    attached = holder(procs, b.address)[0]["session_id"]
    ctl = [sys.executable, "-m", "pasid_client.cli", "--socket", b.socket]
    for argv in (["sets"], ["list", "--all"]):
        doc = json.loads(subprocess.run([*ctl, *argv, "--json"], **RUN).stdout)
        views = {v["set_id"]: v for v in doc["sets"]}
        d, a = views[detached], views[attached]
        assert (d["state"], d["pid"], d["count"]) == ("detached", vmm.pid, 3), d
        assert d["detached_unix"] > 0 and 1.5 <= d["detached_seconds"] < 120, d
        assert (a["state"], a["detached_unix"], a["detached_seconds"]) == ("attached", 0, 0), a
        text = subprocess.run([*ctl, *argv], **RUN).stdout.splitlines()
        assert text[0].split()[-2:] == ["DETACHED", "PASIDS"], text
        # DETACHED is the column before PASIDS (an empty PEER shifts the ones before)
        rows = {int(line.split()[0]): line.split()[-2] for line in text[1:]}
        age = rows[detached]  # e.g. "2s", "3m07s"
        assert age.endswith("s") and age[:-1].isdigit() and int(age[:-1]) >= 1, text
        assert rows[attached] == "-", text
    m = scrape(b.metrics_url)
    assert m.value("pasid_broker_sets", state="detached") == 1
    assert m.value("pasid_broker_detached_verified_sets") == 1
    assert m.value("pasid_broker_detached_oldest_seconds") >= 1.5


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill9", "sigterm"])
def test_watch_sees_a_restart_detach_and_the_reattach(
    b: BrokerProcess, procs: list[subprocess.Popen[str]], sig: int
) -> None:
    """A broker restart detaches every set (point 1): Watch says so as it says any
    detach, set_detached ("broker restarted"), before the set_reattached of the client
    that comes back; it used to show only the set_reattached of a set it never saw go.
    A set detached before the restart is not said to detach again."""
    vmm = start(procs, ["sleep", "120"])
    gone, sidecar = holder(procs, b.address, "--delegate-pid", str(vmm.pid))
    sidecar.kill()  # detached before the restart
    sidecar.wait()
    wait_until(lambda: sets(b)[gone["session_id"]].state == "detached", what="detached")
    hold = start(procs, [*PASIDCTL, "--socket", b.socket, "hold", "--json", "--count", "2"])
    back = read(hold)["session_id"]  # attached when the broker goes; pasidctl comes back
    b.kill(sig)
    b.start()
    wait_until(lambda: sets(b)[back].state == "attached", 30, 0.05, "pasidctl hold back")
    detached = event_of(b, "set_detached", back)
    reattached = event_of(b, "set_reattached", back)
    assert detached.reason == "broker restarted" and detached.revision < reattached.revision
    assert [e.reason for e in events(b, "set_detached") if e.set_id == gone["session_id"]] == [
        "client disconnected"
    ]
    assert sets(b)[gone["session_id"]].state == "detached"
