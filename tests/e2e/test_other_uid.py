"""Another local user (uid/gid 65534, no groups) against every way in: the clients'
socket, the admin socket, and a TCP listener with and without a certificate. Each refusal
has its precise status, and the broker's state is the same afterwards.

Real processes: the probe (tests/e2e/probe.py) runs under setpriv with the test venv's
python and the client library, as a hostile tenant would.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pasid_client import Client
from pasid_client.reconnect import RECONNECT_DEADLINE_SECONDS

from tests.e2e.other_uid import as_nobody, open_for_nobody, require_setpriv
from tests.e2e.test_tls import OPS_SUBJECT, Pki, tcp_address
from tests.harness import ROOT, BrokerProcess, api_holdings

# Half the client library's reconnect deadline (60 s): a refusal that took longer was
# retried as if the broker were starting, instead of being told at once.
RETRIED_SECONDS = RECONNECT_DEADLINE_SECONDS / 2


def probe(calls: list[dict[str, Any]]) -> list[list[Any]]:
    """Run the calls as uid 65534; [status name or "OK", message or result, reason] for
    each. None of them waits out the library's reconnect deadline: a refusal is final."""
    p = as_nobody(
        [sys.executable, "-m", "tests.e2e.probe", json.dumps(calls)],
        stdout=-1,
        stderr=-1,
        cwd=ROOT,
    )
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    got = json.loads(out)
    waited = [g for g in got if g[2] >= RETRIED_SECONDS]
    assert not waited, f"retried as if the broker were starting: {waited}"
    return [[code, msg, reason] for code, msg, _, reason in got]


def state(b: BrokerProcess) -> tuple[dict[int, list[int]], Any]:
    """Who holds what, and the quotas, as root sees them."""
    with Client(b.address) as c:
        q = c.info().quotas
    return api_holdings(b.address), (q.per_set, q.per_client, q.global_)


@contextlib.contextmanager
def open_to_nobody(*flags: str) -> Iterator[BrokerProcess]:
    """A broker (not started yet) whose directory uid 65534 may enter; cleaned up after."""
    require_setpriv()
    b = BrokerProcess(*flags)
    open_for_nobody(b.dir)
    try:
        yield b
    finally:
        b.cleanup()


def probe_beside_root(b: BrokerProcess, calls: list[dict[str, Any]]) -> list[list[Any]]:
    """`probe(calls)` while root's session holds three PASIDs; whatever uid 65534 was
    answered, root's holdings and the quotas are the same afterwards."""
    with Client(b.address) as c, c.session("root-vm", grace_seconds=60) as s:
        s.alloc(1, 100, 3)
        before = state(b)
        got = probe(calls)
        assert state(b) == before, got
    return got


def _pki_for_nobody(b: BrokerProcess) -> Pki:
    pki = Pki(b.dir / "pki")
    pki.dir.chmod(0o755)
    for f in pki.dir.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)  # test keys: nobody must read its own
    return pki


def test_another_uid_reaches_neither_socket() -> None:
    with open_to_nobody() as b:
        b.start()
        got = probe_beside_root(
            b,
            [
                {"address": b.address, "call": "info"},
                {"address": b.address, "call": "session_alloc"},
                {"address": b.admin_address, "call": "list_sets"},
                {"address": b.admin_address, "call": "set_quotas"},
                {"address": b.admin_address, "call": "revoke"},
            ],
        )
        # Told at once (probe), by name: the socket it may not connect to and why.
        assert [g[0] for g in got] == ["PERMISSION_DENIED"] * 5, got
        assert {g[2] for g in got} == {"SOCKET_ACCESS"}, got
        not_in_group = "this user (uid 65534) is not in its group 'root' (mode 0660)"
        # GetInfo goes straight to the gRPC socket; a session and the admin calls prove
        # who they are on the peer socket first (docs/peer-identity.md), refused there.
        assert got[0][1].startswith(f"permission denied connecting to {b.socket}: "), got
        for g in got[1:]:
            assert g[1].startswith(f"permission denied connecting to {b.dir}/peer.sock: "), got
        assert all(not_in_group in g[1] for g in got), got


def test_another_uid_on_an_open_clients_socket_is_a_tenant_not_an_admin() -> None:
    """--socket-mode 0666 lets every local user in, as a tenant: its own session works;
    every admin call is refused per call, whatever the socket's mode."""
    with open_to_nobody("--socket-mode", "0666") as b:
        b.start()
        got = probe_beside_root(
            b,
            [
                {"address": b.address, "call": "list_all"},
                {"address": b.address, "call": "list_sets"},
                {"address": b.address, "call": "set_quotas"},
                {"address": b.address, "call": "revoke"},
                {"address": b.address, "call": "session_alloc"},
            ],
        )
        codes = [g[0] for g in got]
        # List all_sets: PERMISSION_DENIED by the per-call check; PasidAdmin is not
        # served on the clients' socket at all (UNIMPLEMENTED).
        assert codes == [
            "PERMISSION_DENIED",
            "UNIMPLEMENTED",
            "UNIMPLEMENTED",
            "UNIMPLEMENTED",
            "OK",
        ], got
        assert "admin call" in got[0][1]
        assert got[4][1] == [4]  # a tenant like any other: the next free PASID
        # Its set ended with its stream; nothing of root's changed (probe_beside_root).


def test_another_uid_with_a_stolen_token_is_told_whose_set_it_is() -> None:
    """Root's verified set, detached, and its token in uid 65534's hands (with a ticket of
    its own): PERMISSION_DENIED naming whose set it is, not "matches no session"; root's
    set is unchanged and resumes for root."""
    with open_to_nobody("--socket-mode", "0666") as b:
        b.start()
        with Client(b.address) as c:
            s = c.session("root-vm", grace_seconds=60)
            s.alloc(1, 100, 3)
            token, set_id = s.token, s.set_id
            s.detach()
            before = state(b)
            got = probe([{"address": b.address, "call": f"resume:{token}"}])
            assert state(b) == before, got
            assert got == [
                [
                    "PERMISSION_DENIED",
                    f"session {set_id}'s set is held by a kernel-verified process of uid:0,"
                    " not by uid:65534: it resumes only with a peer ticket of uid:0 (the"
                    " handshake on the Unix socket, which the client library does), or"
                    " re-attach it (reattach_set_id) from its holder",
                    "PERMISSION_DENIED",
                ]
            ], got
            with c.session(resume_token=token) as again:
                assert again.resumed and again.set_id == set_id


def test_another_uid_over_tls_with_and_without_a_certificate() -> None:
    with open_to_nobody() as b:
        pki = _pki_for_nobody(b)
        b.args += [*pki.flags(), "--admin-subject", OPS_SUBJECT]
        b.start()
        addr = tcp_address(b)
        tenant = list(pki.tls(pki.tenant_a))
        got = probe_beside_root(
            b,
            [
                {"address": addr, "tls": tenant, "call": "list_sets"},
                {"address": addr, "tls": tenant, "call": "set_quotas"},
                {"address": addr, "tls": tenant, "call": "revoke"},
                {"address": addr, "tls": tenant, "call": "list_all"},
                {"address": addr, "tls": None, "call": "info"},
                {"address": addr, "tls": None, "call": "list_sets"},
            ],
        )
        codes = [g[0] for g in got]
        assert codes == ["PERMISSION_DENIED"] * 4 + ["UNAVAILABLE"] * 2, got
        assert "x509:CN=tenant-a,OU=vmm,O=pasid-broker tests is not an admin" in got[0][1]


def test_another_uid_over_insecure_loopback_tcp_is_anonymous() -> None:
    with open_to_nobody("--listen", "127.0.0.1:0", "--insecure") as b:
        b.start()
        addr = tcp_address(b)
        got = probe_beside_root(
            b,
            [
                {"address": addr, "call": "list_all"},
                {"address": addr, "call": "list_sets"},
                {"address": addr, "call": "set_quotas"},
            ],
        )
        assert [g[0] for g in got] == ["PERMISSION_DENIED", "UNIMPLEMENTED", "UNIMPLEMENTED"]


def test_another_uid_on_an_open_admin_socket_is_refused_per_call() -> None:
    """Even where the admin socket's mode lets another user in (a misconfiguration, made
    here by chmod), each admin call checks who is calling: with its peer ticket uid 65534
    is PERMISSION_DENIED, without one (a stock client) UNAUTHENTICATED."""
    with open_to_nobody("--socket-mode", "0666") as b:
        b.start()
        Path(b.admin_socket).chmod(0o666)
        got = probe_beside_root(
            b,
            [
                {"address": b.admin_address, "call": "list_sets"},
                {"address": b.admin_address, "call": "set_quotas"},
                {"address": b.admin_address, "call": "revoke"},
                {"address": b.admin_address, "call": "list_all"},
                {"address": b.admin_address, "call": "list_sets_stock"},
            ],
        )
        codes = [g[0] for g in got]
        assert codes == ["PERMISSION_DENIED"] * 4 + ["UNAUTHENTICATED"], got
        assert "uid:65534 is not an admin" in got[0][1]
        assert "anonymous" in got[4][1]


def test_another_uid_is_told_which_directory_it_may_not_enter() -> None:
    """The socket's directory closed to the user (the test's own, mode 0700): refused at
    once, naming the directory, not taken for a broker whose socket is not there yet."""
    require_setpriv()
    b = BrokerProcess()
    try:
        b.start()
        got = probe([{"address": b.address, "call": "session_alloc"}])
        assert got == [
            [
                "PERMISSION_DENIED",
                f"permission denied connecting to {b.dir}/peer.sock: this user (uid 65534)"
                f" may not enter its directory {b.dir} (mode 0700, owner root, group root)",
                "SOCKET_ACCESS",
            ]
        ], got
    finally:
        b.cleanup()


def _probe_started(b: BrokerProcess, call: str) -> Any:
    """The probe as uid 65534, started now (the caller starts its broker later)."""
    return as_nobody(
        [
            sys.executable,
            "-m",
            "tests.e2e.probe",
            json.dumps([{"address": b.address, "call": call}]),
        ],
        stdout=-1,
        stderr=-1,
        cwd=ROOT,
    )


def _waits_then_allocates(p: Any, b: BrokerProcess, start: Any) -> None:
    """`p` (an open as uid 65534) is still waiting after a while; once `start()` brings the
    broker up, it allocates."""
    with contextlib.suppress(Exception):
        out, err = p.communicate(timeout=1.5)
        raise AssertionError(f"the open did not wait for the broker: {out} {err}")
    start()
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert [g[0] for g in json.loads(out)] == ["OK"], out


def test_another_uid_waits_for_a_broker_that_is_starting() -> None:
    """A permitted user (--socket-mode 0666) whose open comes before the broker's
    sockets exist (ENOENT) waits for it, as issue 19 asked: only a refusal is final."""
    with open_to_nobody("--socket-mode", "0666") as b:
        p = _probe_started(b, "session_alloc")
        _waits_then_allocates(p, b, lambda: b.start(wait=False))


def test_another_uid_waits_for_a_broker_that_is_restarting() -> None:
    """The broker killed (-9) leaves its sockets behind: connect(2) says ECONNREFUSED,
    which is a broker to wait for, not a refusal of this user."""
    with open_to_nobody("--socket-mode", "0666") as b:
        b.start()
        b.kill()
        assert Path(b.socket).exists() and Path(b.dir, "peer.sock").exists()
        p = _probe_started(b, "session_alloc")
        _waits_then_allocates(p, b, lambda: b.restart(wait=False))


def test_pasidctl_as_another_uid_says_it_may_not_connect() -> None:
    """pasidctl as a user outside the socket's group: exit 1 at once, PERMISSION_DENIED
    naming the socket and the cause, in text on stderr and with --json on stdout; also
    watch and top, which wait for a broker that is not there yet (issue 19), but not for
    one that refuses them."""
    with open_to_nobody() as b:
        b.start()
        for argv in (["info"], ["hold", "--count", "1"], ["watch"], ["top", "--once"]):
            p = as_nobody(
                [sys.executable, "-m", "pasid_client.cli", "--socket", b.socket, *argv],
                stdout=-1,
                stderr=-1,
                cwd=ROOT,
            )
            out, err = p.communicate(timeout=RETRIED_SECONDS)
            assert p.returncode == 1, (argv, out, err)
            # watch and top without a session read the admin socket (mode 0600); info and
            # hold (which first waits for the broker to answer there) the clients' one.
            sock, mode = {"info": (b.socket, "0660"), "hold": (b.socket, "0660")}.get(
                argv[0], (b.admin_socket, "0600")
            )
            assert err.startswith(
                f"pasidctl: PERMISSION_DENIED: permission denied connecting to {sock}: this"
                f" user (uid 65534) is not in its group 'root' (mode {mode})"
            ), err
            assert "waiting" not in err, err
            p = as_nobody(
                [sys.executable, "-m", "pasid_client.cli", "--socket", b.socket, "--json", *argv],
                stdout=-1,
                stderr=-1,
                cwd=ROOT,
            )
            out, _ = p.communicate(timeout=RETRIED_SECONDS)
            assert p.returncode == 1, out
            doc = json.loads(out)
            assert doc["error"]["code"] == "PERMISSION_DENIED", doc
            assert doc["error"]["reason"] == "SOCKET_ACCESS", doc
            assert doc["error"]["message"] == err.split(": ", 2)[2].strip(), doc
