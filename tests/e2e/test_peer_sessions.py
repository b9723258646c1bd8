"""Sessions whose holder the kernel names (docs/peer-identity.md), with real processes:
a client in its own pid namespace, a sidecar delegating its VMM, stock gRPC clients,
tickets replayed or stale, frozen clients, opens abandoned at every instant, restarts."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from typing import Any

import grpc
import pytest
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc
from pasid_client import Client, SetView, Unauthenticated
from pasid_client.handshake import obtain_ticket

from broker.store import checks
from tests.harness import (
    ROOT,
    BrokerProcess,
    assert_memory_matches_disk,
    db_holdings,
    wait_until,
)
from tests.metrics.scrape import scrape
from tests.peer.conftest import need

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
# /metrics names tenants on the brokers of these tests (by default only over mutual TLS):
# they read the top clients and holders.
pytestmark = pytest.mark.broker_args("--metrics-tenants", "on")


def start(procs: list[subprocess.Popen[str]], cmd: list[str]) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=ENV
    )
    procs.append(p)
    return p


def holder(
    procs: list[subprocess.Popen[str]], address: str, *args: str, prefix: tuple[str, ...] = ()
) -> tuple[dict[str, Any], subprocess.Popen[str]]:

    cmd = [*prefix, sys.executable, "-m", "tests.e2e.peer_holder", address, *args]
    p = start(procs, cmd)
    return read(p), p


def read(p: subprocess.Popen[str]) -> dict[str, Any]:
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line, f"client exited with {p.poll()} before answering"
    out: dict[str, Any] = json.loads(line)
    return out


def sets(b: BrokerProcess) -> dict[int, SetView]:
    with Client(b.admin_address) as a:
        return {s.set_id: s for s in a.list_sets()}


def events(b: BrokerProcess, kind: str) -> list[Any]:
    with Client(b.admin_address) as c:  # every set's events: the admin socket
        stream = c.watch(1)
        out = []
        last = c.info().revision
        for ev in stream:
            if ev.kind == kind:
                out.append(ev)
            if ev.revision >= last:
                break
        stream.close()
        return out


def event_of(b: BrokerProcess, kind: str, set_id: int) -> Any:
    """The set's `kind` event from the log as Watch serves it (its destroy is durable a
    moment after the set leaves memory, so wait for it)."""

    def find() -> list[Any]:
        return [e for e in events(b, kind) if e.set_id == set_id]

    [ev] = wait_until(find, what=f"{kind} of set {set_id}")
    return ev


def open_raw(address: str, **fields: Any) -> grpc.RpcError | pb.SessionOpened:
    """One OpenSession on a plain stub; the error, or what was opened (then released:
    the request stream half-closes after the open, and the stream is read to its end)."""
    with grpc.insecure_channel(address) as ch:
        call = pb_grpc.PasidBrokerStub(ch).Session(
            iter([pb.SessionRequest(tag=0, open=pb.OpenSession(client="raw", **fields))])
        )
        try:
            opened = next(call).opened
            for _ in call:
                pass
            return opened
        except grpc.RpcError as exc:
            return exc
        finally:
            call.cancel()


# -- identity from the kernel ------------------------------------------------------------


@pytest.mark.xdist_group("blockdev")  # --mount-proc: a mount namespace (tests/conftest.py)
def test_namespace_client_is_not_confused_with_the_host_process_of_its_pid(
    broker: BrokerProcess, procs: list[subprocess.Popen[str]]
) -> None:
    """Issue 10's first finding: the namespaced client's pid number equals a host
    process's; that host process exiting must not touch the client's set."""
    need("unshare", "--pid", "--fork", "--mount-proc")
    host = start(procs, ["sleep", "60"])
    # In its new pid namespace the client takes the host sleep's number (ns_last_pid).
    script = (
        f"echo {host.pid - 1} > /proc/sys/kernel/ns_last_pid &&"
        f" {sys.executable} -m tests.e2e.peer_holder {broker.address}; :"
    )
    p = start(
        procs,
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "sh", "-c", script],
    )
    ans = read(p)
    assert ans["getpid"] == host.pid, "could not give the client the host process's number"
    view = sets(broker)[ans["session_id"]]
    assert view.verified and view.ns_pid == host.pid and view.pid != host.pid
    host.kill()
    host.wait()
    time.sleep(0.3)  # the declared-pid watch reclaimed within milliseconds of this exit
    assert p.stdin is not None
    p.stdin.write("alloc\n")
    p.stdin.flush()
    assert "pasids" in read(p)
    assert len(sets(broker)[ans["session_id"]].ranges) >= 1
    p.kill()  # the client itself dies: now the set goes
    wait_until(lambda: ans["session_id"] not in sets(broker), what="set released")
    created = event_of(broker, "set_created", ans["session_id"])
    assert created.verified and (created.pid, created.ns_pid) == (view.pid, host.pid)


def test_sidecar_delegation_binds_the_set_to_the_vmm(
    broker: BrokerProcess, procs: list[subprocess.Popen[str]]
) -> None:
    vmm = start(procs, ["sleep", "60"])
    ans, sidecar = holder(procs, broker.address, "--delegate-pid", str(vmm.pid), "--grace", "60")
    view = sets(broker)[ans["session_id"]]
    assert view.verified and view.pid == vmm.pid and view.delegated_by_pid == sidecar.pid
    m = scrape(broker.metrics_url)  # metrics name the verified holder too
    assert m.value("pasid_broker_sets_by_identity", identity="verified") == 1
    held = m.value(
        "pasid_broker_top_holder_pasids",
        set_id=str(view.set_id),
        pid=str(vmm.pid),
        uid=str(os.getuid()),
        ns_pid=str(vmm.pid),
    )
    assert held == 3
    sidecar.kill()  # the sidecar goes: its stream breaks, the set is detached (lives on)
    sidecar.wait()
    wait_until(lambda: sets(broker)[ans["session_id"]].state == "detached", what="detach")
    vmm.kill()  # the VMM goes: the set goes now, grace or not
    wait_until(lambda: ans["session_id"] not in sets(broker), what="set reclaimed")
    gone = event_of(broker, "set_reclaimed", ans["session_id"])
    assert gone.reason == f"holder process {vmm.pid} exited"
    assert_memory_matches_disk(broker)


# -- anonymous (stock) clients -------------------------------------------------------------


def test_stock_grpc_client_is_an_anonymous_session(
    broker: BrokerProcess, procs: list[subprocess.Popen[str]]
) -> None:
    ans, p = holder(procs, broker.address, "--stock")
    assert ans["verified"] is False and ans["pasids"] == [1, 2, 3]
    view = sets(broker)[ans["session_id"]]
    assert not view.verified and view.pid == 0  # its declared pid is not an identity
    p.kill()
    wait_until(lambda: not sets(broker), what="anonymous set ends with its stream")


def test_anonymous_refuse(make_broker: Any, procs: list[subprocess.Popen[str]]) -> None:
    b = make_broker("--anonymous", "refuse")
    ans, _ = holder(procs, b.address, "--stock")
    assert ans["error"] == "UNAUTHENTICATED" and "--anonymous refuse" in ans["details"]
    assert not sets(b)
    ans, _ = holder(procs, b.address)  # the library handshakes by itself
    assert ans["verified"] is True


# -- tickets -----------------------------------------------------------------------------


def tcp_address(b: BrokerProcess) -> str:
    """The --listen address the broker logged (port 0 resolved)."""
    serving = [json.loads(x) for x in b.read_log().splitlines() if '"serving"' in x][-1]
    return next(a for a in serving["addresses"].split(",") if not a.startswith("unix:"))


def test_ticket_replayed_stale_or_mismatched_changes_nothing(make_broker: Any) -> None:
    b = make_broker("--ticket-seconds", "1", "--listen", "127.0.0.1:0", "--insecure")
    peer = os.path.join(b.dir, "peer.sock")
    t = obtain_ticket(peer)
    assert (t.pid, t.ns_pid, t.uid) == (os.getpid(), os.getpid(), os.getuid())
    opened = open_raw(b.address, ticket=t.ticket, pid=os.getpid())
    assert isinstance(opened, pb.SessionOpened) and opened.verified
    wait_until(lambda: not sets(b), what="first set closed")
    for bad, code, says in [
        (t.ticket, grpc.StatusCode.UNAUTHENTICATED, "already used"),
        ("made-up", grpc.StatusCode.UNAUTHENTICATED, "unknown ticket"),
    ]:
        err = open_raw(b.address, ticket=bad)
        assert isinstance(err, grpc.RpcError) and err.code() == code, err
        assert says in (err.details() or "")
        assert dict(err.trailing_metadata() or ())["pasid-reason"] == "TICKET"
    err = open_raw(b.address, ticket=obtain_ticket(peer).ticket, pid=1)
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"declared pid 1 is not the verified holder: the kernel says pid {os.getpid()}" in (
        err.details() or ""
    )
    err = open_raw(tcp_address(b), ticket=obtain_ticket(peer).ticket)
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "only accepted on the Unix socket" in (err.details() or "")
    stale = obtain_ticket(peer).ticket
    time.sleep(1.2)
    err = open_raw(b.address, ticket=stale)
    assert isinstance(err, grpc.RpcError) and "expired" in (err.details() or "")
    assert not sets(b) and b.health() == "SERVING"
    assert_memory_matches_disk(b)


# -- liveness ----------------------------------------------------------------------------


def test_sigstopped_local_client_keeps_its_set_past_the_keepalive(
    make_broker: Any, procs: list[subprocess.Popen[str]]
) -> None:
    """A frozen VMM keeps its set (the kernel frees at exit, not at freeze); a frozen
    TCP client stopped at the same moment is dropped by keepalive, which shows that the
    freeze lasted well past what keepalive would have allowed."""
    b = make_broker("--keepalive-seconds", "1", "--listen", "127.0.0.1:0", "--insecure")
    tcp_addr = tcp_address(b)
    local, lp = holder(procs, b.address, "--keepalive", "1")
    remote, rp = holder(procs, tcp_addr, "--keepalive", "1")
    assert local["verified"] and not remote["verified"]
    lp.send_signal(signal.SIGSTOP)
    rp.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    wait_until(lambda: remote["session_id"] not in sets(b), 15, 0.1, "TCP set dropped")
    time.sleep(max(0.0, 3.0 - (time.monotonic() - t0)))  # 3 keepalive periods at least
    assert local["session_id"] in sets(b)
    lp.send_signal(signal.SIGCONT)
    assert lp.stdin is not None
    lp.stdin.write("alloc\n")
    lp.stdin.flush()
    assert read(lp)["pasids"] == [4]  # the stream itself survived the freeze
    assert_memory_matches_disk(b)


# -- atomic open ---------------------------------------------------------------------------


def test_abandoned_and_killed_opens_leave_no_set(
    broker: BrokerProcess, procs: list[subprocess.Popen[str]]
) -> None:
    rnd = random.Random(10)
    storm = [sys.executable, "-m", "tests.e2e.open_storm", broker.address]
    finite = [start(procs, [*storm, "1000", str(i)]) for i in range(2)]
    for round_ in range(3):  # clients killed in the middle of opening
        doomed = [start(procs, [*storm, "0", str(100 + round_ * 10 + i)]) for i in range(3)]
        for p in doomed:
            time.sleep(rnd.uniform(0.05, 0.25))
            p.kill()
    opens = sum(read(p)["opens"] for p in finite)
    assert opens == 2000
    # gone from memory, then durably (a destroy commits a moment after it is decided)
    wait_until(lambda: not sets(broker) and not db_holdings(broker.db), 10, 0.05, "no sets")
    assert assert_memory_matches_disk(broker) == {}
    created = len(events(broker, "set_created"))
    assert created > 100, f"only {created} opens got as far as a set; the test tests nothing"


def test_an_open_whose_reply_was_read_is_detached_not_destroyed(broker: BrokerProcess) -> None:
    """A client that reads `opened` and cancels at once knows that it holds the set: its
    broken stream detaches the set (an anonymous one for its grace, a verified one for its
    holder's life), never destroys it as an abandoned open. grpc closes the handler at the
    reply's send when a cancel races it, even once the reply has arrived: when the open
    counted as answered only after that send, 8 such sets in 90 were destroyed."""
    peer = os.path.join(broker.dir, "peer.sock")

    async def run() -> list[int]:
        async with grpc.aio.insecure_channel(broker.address) as ch:
            stub = pb_grpc.PasidBrokerStub(ch)
            slots = asyncio.Semaphore(12)

            async def one(i: int) -> int:
                # Every fourth one verified: the test process is its holder.
                ticket = (await asyncio.to_thread(obtain_ticket, peer)).ticket if i % 4 == 0 else ""
                async with slots:
                    call = stub.Session()
                    opening = pb.OpenSession(client=f"c{i}", grace_seconds=300, ticket=ticket)
                    await call.write(pb.SessionRequest(tag=0, open=opening))
                    opened = (await call.read()).opened
                    call.cancel()
                    return int(opened.set_id)

            return await asyncio.gather(*(one(i) for i in range(90)))

    ids = set(asyncio.run(run()))
    assert len(ids) == 90
    wait_until(
        lambda: all(s.detached_unix for s in sets(broker).values()), 10, 0.05, "all detached"
    )
    assert set(sets(broker)) == ids
    assert "before its open's reply was sent" not in broker.read_log()


def test_holders_killed_at_once_are_reclaimed_without_internal_errors(
    broker: BrokerProcess, procs: list[subprocess.Popen[str]]
) -> None:
    """20 verified holders SIGKILLed together: every set ends (by its pidfd, or by its
    stream if grpc sees the closed socket first), and the streams whose peers were
    already gone end quietly. Before, the reclaim's abort of such a stream failed in grpc
    (no one to send the status to) and the broker logged two tracebacks per dead client,
    as internal errors, in the middle of the release."""
    held = [holder(procs, broker.address) for _ in range(20)]
    assert all(ans["verified"] for ans, _ in held)
    for _, p in held:
        p.kill()
    for _, p in held:
        p.wait(10)
    wait_until(lambda: not sets(broker) and not db_holdings(broker.db), 10, 0.05, "no sets")
    ended = {e.set_id for k in ("set_reclaimed", "set_destroyed") for e in events(broker, k)}
    assert {ans["session_id"] for ans, _ in held} <= ended
    time.sleep(0.5)  # the streams' own ends come after the reclaims
    errors = [x for x in broker.read_log().splitlines() if '"level": "error"' in x]
    assert errors == []


# -- restart -----------------------------------------------------------------------------


def test_restart_recognises_the_holder_by_pid_and_start_time(
    broker: BrokerProcess, procs: list[subprocess.Popen[str]]
) -> None:
    ans, p = holder(procs, broker.address, "--grace", "60")
    ans2, p2 = holder(procs, broker.address, "--grace", "60")
    broker.kill()
    # A reused pid would have another start time: make set 2's stored one disagree. As
    # the broker would have stored it (a pid reused by another process), with the sets'
    # digest to match (an edit that does not match is refused: test_store_checks.py).
    with sqlite3.connect(broker.db) as con:
        con.execute(
            "UPDATE sets SET holder_start_time = holder_start_time - 1 WHERE set_id = ?",
            (ans2["session_id"],),
        )
        checks.store_sets_digest(con, checks.count_sets_digest(con))
    con.close()
    broker.start()
    left = sets(broker)
    assert set(left) == {ans["session_id"]}, "the set whose start time differs is reclaimed"
    assert left[ans["session_id"]].verified and left[ans["session_id"]].pid == p.pid
    p.kill()  # the holder, watched again after the restart, exits: reclaimed now
    wait_until(lambda: not sets(broker), 5, 0.02, "set reclaimed on holder exit")
    assert p2.poll() is None  # the other holder lived all along


# -- the client library and pasidctl -------------------------------------------------------


def test_async_client_handshakes_and_delegates_by_pidfd(
    broker: BrokerProcess, procs: list[subprocess.Popen[str]]
) -> None:
    import asyncio

    from pasid_client import AsyncClient

    vmm = start(procs, ["sleep", "60"])

    async def run() -> None:
        async with AsyncClient(broker.address) as c:
            async with c.session("own") as s:
                assert s.verified
                assert sets(broker)[s.set_id].pid == os.getpid()
            fd = os.pidfd_open(vmm.pid)
            try:
                async with c.session("for-vmm", delegate_pidfd=fd) as s:
                    view = sets(broker)[s.set_id]
                    assert (view.pid, view.delegated_by_pid) == (vmm.pid, os.getpid())
            finally:
                os.close(fd)

    asyncio.run(run())


def test_without_a_peer_socket_the_library_opens_anonymously(broker: BrokerProcess) -> None:
    """An older broker has no peer socket: the library still works, anonymously."""
    with Client(broker.address, peer_socket="/nonexistent/peer.sock") as c, c.session() as s:
        assert not s.verified and not sets(broker)[s.set_id].verified


def test_pasidctl_hold_delegates_and_sets_shows_the_holder(
    broker: BrokerProcess, procs: list[subprocess.Popen[str]]
) -> None:
    vmm = start(procs, ["sleep", "60"])
    ctl = [sys.executable, "-m", "pasid_client.cli", "--socket", broker.socket]
    hold = start(procs, [*ctl, "hold", "--json", "--count", "2", "--delegate-pid", str(vmm.pid)])
    ans = read(hold)
    assert ans["verified"] is True and ans["pasids"] == [1, 2]
    out = subprocess.run([*ctl, "sets"], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()[:2]
    assert header.split()[3:6] == ["PID", "UID", "NS_PID"]
    assert row.split()[3:6] == [str(vmm.pid), str(os.getuid()), str(vmm.pid)]
    vmm.kill()  # the VMM's exit takes the set (and ends the hold)
    wait_until(lambda: not sets(broker), what="set reclaimed with the VMM")
    assert hold.wait(10) == 1  # hold ends, saying the broker ended the session


def test_session_with_a_ticket_obtained_beforehand(broker: BrokerProcess) -> None:
    """How a caller passing extra fds over the handshake (issue 14) opens its session."""
    t = obtain_ticket(os.path.join(broker.dir, "peer.sock"))
    with Client(broker.address) as c, c.session("pre", ticket=t) as s:
        assert s.verified and sets(broker)[s.set_id].pid == os.getpid()
    with Client(broker.address) as c, pytest.raises(Unauthenticated, match="already used"):
        c.session("again", ticket=t)


def test_a_ticketless_resume_of_a_verified_set_says_what_it_needs(
    broker: BrokerProcess,
) -> None:
    """A verified holder's token presented without a ticket (a stock gRPC client) is
    refused UNAUTHENTICATED saying that the set is a verified process's and how to resume
    it, not "matches no session" (which sent people looking for an expired token). The
    set stays as it was, and resumes with a ticket."""
    with Client(broker.address) as c:
        s = c.session("vm", grace_seconds=60)
        assert s.verified
        s.alloc(1, 100, 2)
        token, set_id = s.token, s.set_id
        s.detach()
        before = sets(broker)[set_id]
        err = open_raw(broker.address, resume_token=token)
        assert isinstance(err, grpc.RpcError), err
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert err.details() == (
            f"session {set_id}'s set is held by a kernel-verified process of"
            f" uid:{os.getuid()}: a resume without an identity is refused; resume it with a"
            f" peer ticket of uid:{os.getuid()} (the handshake on the Unix socket, which the"
            " client library does), or re-attach it (reattach_set_id) from its holder"
        )
        assert dict(err.trailing_metadata() or ())["pasid-reason"] == "TICKET"
        after = sets(broker)[set_id]
        assert (after.state, list(after.pasids())) == (before.state, list(before.pasids()))
        assert after.state == "detached"
        with c.session(resume_token=token) as again:
            assert again.resumed and again.set_id == set_id
