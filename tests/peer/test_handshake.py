"""The peer handshake with real processes on a real SOCK_SEQPACKET socket."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
from collections.abc import Iterator

import pytest

from broker.peer import credentials as cred
from broker.peer.tickets import TicketError
from tests.harness import wait_until
from tests.peer.conftest import ManualClock, PeerFixture, need

NOBODY = 65534
OTHER = 4242


def test_own_identity_from_the_kernel(peer: PeerFixture) -> None:
    ans, proc = peer.client(linger=True)
    try:
        assert ans["ok"], ans
        assert (ans["pid"], ans["ns_pid"], ans["uid"]) == (proc.pid, proc.pid, os.getuid())
        assert ans["delegated"] is False
        assert len(ans["ticket"]) >= 43  # 32 random bytes, url-safe base64
        ident = peer.on_loop(lambda: peer.book.take(ans["ticket"]))
        assert cred.pidfd_pid(ident.pidfd) == proc.pid
        assert ident.start_time == cred.start_time(proc.pid)
        assert cred.pidfd_alive(ident.pidfd)
        proc.kill()
        proc.wait()
        assert not cred.pidfd_alive(ident.pidfd)  # the held pidfd reports the exit
        ident.close()
    finally:
        proc.kill()


def test_ticket_is_one_time(peer: PeerFixture) -> None:
    # The client lingers: an exited client's ticket is voided (issue 19), which would
    # race this test's first take.
    ans, proc = peer.client(linger=True)
    try:
        first = peer.on_loop(lambda: peer.book.take(ans["ticket"]))
        first.close()
        with pytest.raises(TicketError, match="already used"):
            peer.on_loop(lambda: peer.book.take(ans["ticket"]))
        with pytest.raises(TicketError, match="unknown ticket"):
            peer.on_loop(lambda: peer.book.take("x" * 43))
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def a_live_ticket_past_its_ttl() -> Iterator[tuple[PeerFixture, str]]:
    """A book (TTL 0.2 s) holding one ticket, on a clock that moves only when told, then
    moved past the TTL: the ticket is live until then, however slow the machine. Its
    client stays alive (an exited client's ticket is voided at once, which is another
    rule: test_tickets). All closed after."""
    clock = ManualClock()
    f = PeerFixture(ttl=0.2, clock=clock)
    proc = None
    try:
        ans, proc = f.client(linger=True)
        assert ans["ok"], ans
        assert len(f.book) == 1
        clock.advance(0.3)
        yield f, ans["ticket"]
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        f.close()


def test_stale_ticket_is_refused_and_its_pidfd_closed() -> None:
    with a_live_ticket_past_its_ttl() as (f, ticket):
        with pytest.raises(TicketError, match=r"expired \(valid 0.2 s\)"):
            f.on_loop(lambda: f.book.take(ticket))
        assert len(f.book) == 0


def test_unused_tickets_are_swept_without_further_traffic() -> None:
    with a_live_ticket_past_its_ttl() as (f, _):  # no handshake or open follows
        wait_until(lambda: len(f.book) == 0, 5, 0.05, "the sweeper closes the unused ticket")


@pytest.mark.xdist_group("blockdev")  # --mount-proc: a mount namespace (tests/conftest.py)
def test_namespace_client_gets_its_host_pid(peer: PeerFixture) -> None:
    need("unshare", "--pid", "--fork", "--mount-proc")
    ans, proc = peer.client(prefix=("unshare", "--pid", "--fork", "--mount-proc"), linger=True)
    try:
        assert ans["ok"], ans
        # It sees itself as pid 1 (and claimed 1); the kernel names its host pid.
        assert ans["getpid"] == 1 and ans["ns_pid"] == 1
        assert ans["pid"] != 1
        with open(f"/proc/{ans['pid']}/status") as st:
            assert f"NSpid:\t{ans['pid']}\t1" in st.read()
    finally:
        proc.kill()
        proc.wait()


def test_false_pid_claim_is_refused(peer: PeerFixture) -> None:
    ans = peer.client("--raw", json.dumps({"v": 1, "pid": 1}))
    assert ans == {**ans, "ok": False, "code": "PERMISSION_DENIED"}
    assert "declared pid 1 is not this process" in ans["error"]
    assert len(peer.book) == 0


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("not json", "not a UTF-8 JSON object"),
        ("[1]", "must be a JSON object"),
        ('{"v": 2}', "version 2"),
        ('{"v": 1, "pid": -3}', "positive integer"),
        ('{"v": 1, "fds": ["pidfd"]}', "1 roles but 0 fds"),
        ('{"v": 1, "devices": [{"name": 1}]}', "devices must be a list"),
    ],
)
def test_bad_handshake_is_refused_clearly(peer: PeerFixture, raw: str, says: str) -> None:
    ans = peer.client("--raw", raw)
    assert ans["ok"] is False and ans["code"] == "INVALID_ARGUMENT"
    assert says in ans["error"]
    assert len(peer.book) == 0
    assert peer.client()["ok"]  # still serving


def test_unregistered_fd_role_is_refused(peer: PeerFixture) -> None:
    ans = peer.client("--fd-role", "iommufd")
    assert ans["code"] == "INVALID_ARGUMENT" and "'iommufd' is not accepted" in ans["error"]


def test_extra_fd_roles_travel_with_the_ticket() -> None:
    seen: list[int] = []
    f = PeerFixture(fd_checks={"device": lambda fd, msg, facts: seen.append(facts.pid)})
    proc = None
    try:
        # Lingering: an exited client's ticket would be voided before the take.
        ans, proc = f.client("--fd-role", "device", linger=True)
        assert ans["ok"], ans
        ident = f.on_loop(lambda: f.book.take(ans["ticket"]))
        assert [d.role for d in ident.fds] == ["device"] and seen == [ans["pid"]]
        os.fstat(ident.fds[0].fd)  # a live fd the broker now holds
        ident.close()
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        f.close()


def test_a_stopping_broker_refuses_every_handshake_and_keeps_no_fd() -> None:
    """refuse_all (the broker draining): UNAVAILABLE with the broker's words, no ticket,
    and an fd sent with the handshake is closed, not adopted."""
    seen: list[int] = []
    f = PeerFixture(fd_checks={"device": lambda fd, msg, facts: seen.append(fd)})
    try:
        assert f.client()["ok"]
        issued = f.on_loop(lambda: len(f.book))
        f.on_loop(lambda: f.server.refuse_all("broker is shutting down; try later"))
        open_fds = len(os.listdir("/proc/self/fd"))  # the server runs in this process
        for args in ((), ("--fd-role", "device")):
            ans = f.client(*args)
            assert (ans["ok"], ans["code"], ans["error"]) == (
                False,
                "UNAVAILABLE",
                "broker is shutting down; try later",
            ), ans
            assert "ticket" not in ans, ans
        assert seen == [] and f.on_loop(lambda: len(f.book)) == issued
        assert len(os.listdir("/proc/self/fd")) == open_fds
    finally:
        f.close()


def test_not_a_pidfd_is_refused(peer: PeerFixture) -> None:
    ans = peer.client("--fd-role", "pidfd")  # an eventfd sent as a pidfd
    assert ans["code"] == "INVALID_ARGUMENT" and "not a pidfd" in ans["error"]


def _vmm(*prefix: str) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([*prefix, "sleep", "60"])
    wait_until(lambda: os.path.exists(f"/proc/{p.pid}/exe"), what="vmm")
    return p


def test_sidecar_delegates_a_vmm(peer: PeerFixture) -> None:
    vmm = _vmm()
    try:
        ans = peer.client("--delegate", str(vmm.pid))
        assert ans["ok"], ans
        assert (ans["pid"], ans["delegated"]) == (vmm.pid, True)
        ident = peer.on_loop(lambda: peer.book.take(ans["ticket"]))
        assert ident.delegated_by == (ans["getpid"], os.getuid())
        assert cred.pidfd_alive(ident.pidfd)  # the sidecar has exited; the VMM lives
        vmm.kill()
        vmm.wait()
        assert not cred.pidfd_alive(ident.pidfd)
        ident.close()
    finally:
        vmm.kill()


def test_delegating_another_uids_process_is_refused(peer: PeerFixture) -> None:
    need("setpriv", "--reuid", str(OTHER), "--regid", str(OTHER), "--clear-groups")
    vmm = _vmm("setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups")
    try:
        as_other = ("setpriv", "--reuid", str(OTHER), "--regid", str(OTHER), "--clear-groups")
        ans = peer.client("--delegate", str(vmm.pid), prefix=as_other)
        assert ans["uid"] == OTHER
        assert ans["ok"] is False and ans["code"] == "PERMISSION_DENIED", ans
        assert f"uid {OTHER} may not delegate process {vmm.pid}" in ans["error"]
        assert len(peer.book) == 0
        # root may, and the same uid may
        assert peer.client("--delegate", str(vmm.pid))["ok"]
        as_nobody = ("setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups")
        ans = peer.client("--delegate", str(vmm.pid), prefix=as_nobody)
        assert ans["ok"] and ans["uid"] == NOBODY and ans["pid"] == vmm.pid, ans
    finally:
        vmm.kill()


def test_fallback_without_so_peerpidfd_names_the_peer() -> None:
    """pidfd_open after SO_PEERCRED, as on kernels before 6.5 (called directly here,
    since this kernel has SO_PEERPIDFD)."""
    srv, cli = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = os.fork()
    if child == 0:  # the peer: hold the connection until told to go
        srv.close()
        cli.recv(1)
        os._exit(0)
    cli.close()
    try:
        c = cred.peer_cred(srv)  # a socketpair's peer credentials are its creator's
        assert c.pid == os.getpid()
        accepted = cred.boot_ticks()
        fd = cred.peer_pidfd_fallback(srv, c, accepted)
        assert cred.pidfd_pid(fd) == os.getpid()
        os.close(fd)
        # A process that started after the accept cannot be the peer (a reused pid).
        with pytest.raises(cred.CredentialError, match="exited during the handshake"):
            cred.peer_pidfd_fallback(srv, cred.PeerCred(child, 0, 0), accepted - 10**6)
    finally:
        srv.send(b"x")
        os.waitpid(child, 0)
        srv.close()


def test_fallback_refuses_a_peer_that_hung_up() -> None:
    srv, cli = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    cli.close()
    with pytest.raises(cred.CredentialError):
        cred.peer_pidfd_fallback(srv, cred.peer_cred(srv), cred.boot_ticks())
    srv.close()


def test_silent_peer_does_not_block_others(peer: PeerFixture) -> None:
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    silent.connect(peer.path)
    try:
        assert peer.client()["ok"]
    finally:
        silent.close()


def test_whole_handshake_on_the_pre_6_5_path(
    peer: PeerFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on a kernel without SO_PEERPIDFD: getsockopt refuses the option (here an
    unknown option number, ENOPROTOOPT as on Linux < 6.5), so pidfd_open + checks run."""
    monkeypatch.setattr(cred, "SO_PEERPIDFD", 0x7FFF)
    ans, proc = peer.client(linger=True)
    try:
        assert ans["ok"] and ans["pid"] == proc.pid, ans
        ident = peer.on_loop(lambda: peer.book.take(ans["ticket"]))
        assert cred.pidfd_pid(ident.pidfd) == proc.pid
        ident.close()
    finally:
        proc.kill()
        proc.wait()
