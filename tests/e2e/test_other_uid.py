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

from tests.e2e.other_uid import as_nobody, open_for_nobody, require_setpriv
from tests.e2e.test_tls import OPS_SUBJECT, Pki, tcp_address
from tests.harness import ROOT, BrokerProcess, api_holdings


def probe(calls: list[dict[str, Any]]) -> list[list[Any]]:
    """Run the calls as uid 65534; [status name or "OK", message or result] for each."""
    p = as_nobody(
        [sys.executable, "-m", "tests.e2e.probe", json.dumps(calls)],
        stdout=-1,
        stderr=-1,
        cwd=ROOT,
    )
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    return list(json.loads(out))


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
        assert [g[0] for g in got] == ["UNAVAILABLE"] * 5, got
        assert all("Permission denied" in g[1] or "connect" in g[1] for g in got), got


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
