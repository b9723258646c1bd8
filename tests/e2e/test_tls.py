"""TCP: mutual TLS (identity = certificate subject), certificates rotated on a live
broker, and the rules that keep plain TCP to loopback with --insecure.

Real broker processes and real TLS handshakes; certificates are made by tests/e2e/certs.py
at run time.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc
from pasid_client import Client, PermissionDenied, QuotaExceeded, Unavailable

from tests.e2e.certs import CertAuthority, Issued
from tests.harness import BrokerProcess, run_broker_once, wait_until


def tcp_address(b: BrokerProcess) -> str:
    """The TCP address the broker logged as serving (it picked the port for :0)."""
    for line in b.read_log().splitlines():
        if '"addresses"' in line:
            for a in json.loads(line)["addresses"].split(","):
                if not a.startswith("unix:"):
                    return str(a)
    raise AssertionError(f"no TCP address logged:\n{b.read_log()}")


class Pki:
    """A CA, the broker's certificate, and client certificates, in one directory."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        self.ca = CertAuthority(dir, "ca one")
        self.server = self.ca.issue("server", "localhost", server=True)
        self.tenant_a = self.ca.issue("tenant-a", "tenant-a", ou="vmm")
        self.tenant_b = self.ca.issue("tenant-b", "tenant-b", ou="vmm")
        self.ops = self.ca.issue("ops", "ops", ou="admins")
        # The files the broker reads: replaced by rename on rotation.
        self.cert, self.key, self.client_ca = dir / "srv.crt", dir / "srv.key", dir / "clients.pem"
        self.install(self.server, self.ca)

    def install(self, server: Issued, ca: CertAuthority) -> None:
        for src, dst in (
            (server.cert, self.cert),
            (server.key, self.key),
            (ca.path, self.client_ca),
        ):
            tmp = dst.with_name(dst.name + ".new")
            tmp.write_bytes(src.read_bytes())
            os.replace(tmp, dst)

    def flags(self) -> list[str]:
        return [
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            str(self.cert),
            "--tls-key",
            str(self.key),
            "--tls-client-ca",
            str(self.client_ca),
        ]

    def tls(self, who: Issued, ca: CertAuthority | None = None) -> tuple[str, str, str]:
        return (str((ca or self.ca).path), str(who.cert), str(who.key))


OPS_SUBJECT = "CN=ops,OU=admins,O=pasid-broker tests"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def tls_broker(pki: Pki) -> Iterator[BrokerProcess]:
    b = BrokerProcess(*pki.flags(), "--admin-subject", OPS_SUBJECT, "--quota-per-identity", "3")
    b.start()
    yield b
    b.cleanup()


def test_tcp_identity_is_the_certificate_subject(pki: Pki, tls_broker: BrokerProcess) -> None:
    """The per-identity quota counts by certificate subject: another client name or
    another session does not escape it; another certificate has its own."""
    addr = tcp_address(tls_broker)
    tenant_a = pki.tls(pki.tenant_a)
    with Client(addr, tls=tenant_a) as a, a.session("vm1") as s1, a.session("renamed") as s2:
        assert s1.alloc(1, 100, 2) == [1, 2]
        assert s2.alloc(1, 100) == [3]
        with pytest.raises(QuotaExceeded) as e:
            s2.alloc(1, 100)
        assert (e.value.quota, e.value.limit) == ("client", 3)
        assert "x509:CN=tenant-a,OU=vmm,O=pasid-broker tests holds 3" in e.value.message
        with Client(addr, tls=pki.tls(pki.tenant_b)) as b, b.session("vm1") as t:
            assert t.alloc(1, 100, 3) == [4, 5, 6]


def test_admin_over_tcp_needs_an_admin_subject(pki: Pki, tls_broker: BrokerProcess) -> None:
    addr = tcp_address(tls_broker)
    with Client(addr, tls=pki.tls(pki.tenant_a)) as a, a.session("mine") as s:
        s.alloc(1, 10)
        with pytest.raises(PermissionDenied, match=r"x509:CN=tenant-a.* is not an admin"):
            a.list_sets()
        with pytest.raises(PermissionDenied, match="admin call"):
            a.set_quotas(per_set=5000)
        with Client(addr, tls=pki.tls(pki.ops)) as ops:
            assert [v.client for v in ops.list_sets()] == ["mine"]
            info = ops.set_quotas(per_set=7, per_client=3)
            assert info.quotas.per_set == 7


def test_no_certificate_no_call(pki: Pki, tls_broker: BrokerProcess) -> None:
    """Without a client certificate (or in plain text) the TLS handshake fails: UNAVAILABLE,
    and nothing changes."""
    addr = tcp_address(tls_broker)
    with Client(tls_broker.address) as c:
        before = c.info().in_use
    for creds in (grpc.ssl_channel_credentials(pki.ca.pem), None):
        ch = grpc.secure_channel(addr, creds) if creds is not None else grpc.insecure_channel(addr)
        with ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.PasidBrokerStub(ch).GetInfo(pb.GetInfoRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    other = CertAuthority(pki.dir / "rogue", "rogue ca")
    rogue = other.issue("rogue", "tenant-a", ou="vmm")  # the same subject, wrong CA
    rogue_tls = (str(pki.ca.path), str(rogue.cert), str(rogue.key))
    with Client(addr, tls=rogue_tls) as r, pytest.raises(Unavailable):
        r.info()
    with Client(tls_broker.address) as c:
        assert c.info().in_use == before


def test_certificates_rotate_without_restart(pki: Pki, tls_broker: BrokerProcess) -> None:
    """New server certificate and client CA by rename: new handshakes use them, the
    broker keeps its pid and its sessions."""
    addr = tcp_address(tls_broker)
    pid = tls_broker.proc.pid if tls_broker.proc else 0
    with Client(addr, tls=pki.tls(pki.tenant_a)) as a:
        assert a.info().capacity > 0
    ca2 = CertAuthority(pki.dir / "two", "ca two")
    server2 = ca2.issue("server", "localhost", server=True)
    tenant2 = ca2.issue("tenant-a", "tenant-a", ou="vmm")
    with Client(tls_broker.address) as local, local.session("survivor", grace_seconds=60) as s:
        s.alloc(1, 10)
        pki.install(server2, ca2)

        def new_ca_works() -> bool:
            try:
                with Client(addr, tls=pki.tls(tenant2, ca2), timeout=2) as c2:
                    return c2.info().capacity > 0
            except Unavailable:
                return False

        wait_until(new_ca_works, 10, 0.2, "the rotated certificates to be served")
        # The old client certificate (signed by the retired CA) is refused now.
        with Client(addr, tls=pki.tls(pki.tenant_a), timeout=2) as old, pytest.raises(Unavailable):
            old.info()
        assert tls_broker.proc is not None and tls_broker.proc.pid == pid
        assert tls_broker.proc.poll() is None
        assert [p for r in s.list().ranges for p in range(r[0], r[1] + 1)] == [1]
    assert "TLS certificates reloaded" in tls_broker.read_log()


def _channel(addr: str, tls: tuple[str, str, str]) -> grpc.Channel:
    ca, cert, key = (Path(p).read_bytes() for p in tls)
    return grpc.secure_channel(addr, grpc.ssl_channel_credentials(ca, key, cert))


def test_a_connection_open_across_a_ca_rotation_is_cut_within_its_maximum_age(
    pki: Pki,
) -> None:
    """Issue 20, point 9: an admin's connection kept open after its CA was rotated out
    kept admin rights for as long as it stayed open. With --tls-max-connection-age 2 and
    a grace of 1 s, its open Watch ends, and its next call needs a handshake that the
    retired CA's certificate fails, within about 1.1 x 2 + 1 s (asserted with a generous
    margin); while the CA is unchanged, calls across the age boundary keep working (the
    client reconnects transparently)."""
    age, grace = 2.0, 1.0
    b = BrokerProcess(
        *pki.flags(),
        "--admin-subject",
        OPS_SUBJECT,
        "--tls-max-connection-age",
        str(age),
        "--tls-max-connection-age-grace",
        str(grace),
    ).start()
    try:
        addr = tcp_address(b)
        with _channel(addr, pki.tls(pki.ops)) as ch:
            admin = pb_grpc.PasidAdminStub(ch)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 2 * age + grace:  # across the age: still served
                admin.ListSets(pb.ListSetsRequest(), timeout=5)
                time.sleep(0.05)
            ended: list[tuple[float, grpc.StatusCode]] = []

            def watch() -> None:
                try:
                    for _ in pb_grpc.PasidBrokerStub(ch).Watch(pb.WatchRequest()):
                        pass
                except grpc.RpcError as exc:
                    ended.append((time.monotonic(), exc.code()))

            admin.ListSets(pb.ListSetsRequest(), timeout=5)  # the connection is live now
            opened = time.monotonic()
            t = threading.Thread(target=watch)
            t.start()
            ca2 = CertAuthority(pki.dir / "two", "ca two")
            pki.install(pki.server, ca2)  # the client CA rotated: ops' certificate retired
            t.join(30)
            assert ended, "the admin's Watch outlived the bound"
            cut, code = ended[0]
            bound = 1.1 * age + grace
            print(f"Watch ended {cut - opened:.2f} s after its connection was live ({code})")
            assert cut - opened <= bound + 5, f"cut after {cut - opened:.1f} s; bound {bound} s"
            assert code is grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.RpcError) as e:
                admin.ListSets(pb.ListSetsRequest(), timeout=5)
            assert e.value.code() is grpc.StatusCode.UNAVAILABLE
        # A certificate of the new CA is served (the rotation took effect).
        ops2 = ca2.issue("ops", "ops", ou="admins")
        with Client(addr, tls=pki.tls(ops2), timeout=5) as c:
            assert c.list_sets() == []
    finally:
        b.cleanup()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--listen", "0.0.0.0:0"], "not a loopback address and has no TLS"),
        (["--listen", "0.0.0.0:0", "--insecure"], "not a loopback address and has no TLS"),
        (["--listen", "127.0.0.1:0"], "without TLS needs --insecure"),
        (
            ["--listen", "127.0.0.1:0", "--tls-cert", "/x.pem"],
            "TLS needs --tls-client-ca, --tls-key",
        ),
        (["--admin-subject", "CN=ops"], "--admin-subject needs a TLS listener"),
        (["--admin-group", "no-such-group-here"], "no such group"),
    ],
)
def test_unsafe_listeners_refuse_to_start(tmp_path: Path, flags: list[str], message: str) -> None:
    r = run_broker_once(
        "--db", str(tmp_path / "b.db"), "--socket", str(tmp_path / "b.sock"), *flags
    )
    assert r.returncode == 2, r.stderr
    # One line for people (the log line before it is the same text, for the journal).
    said = [ln for ln in r.stderr.splitlines() if ln.startswith("pasid-broker: cannot start: ")]
    assert len(said) == 1 and message in said[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "b.sock").exists()


def test_insecure_loopback_is_anonymous_and_warned_at_every_start() -> None:
    b = BrokerProcess("--listen", "127.0.0.1:0", "--insecure")
    try:
        b.start()
        addr = tcp_address(b)
        with Client(addr) as c:
            with c.session("plain") as s:
                assert s.alloc(1, 10) == [1]
            # No identity, so never admin: List all_sets is refused.
            stub = pb_grpc.PasidBrokerStub(c._channel)
            with pytest.raises(grpc.RpcError) as e:
                stub.List(pb.ListRequest(all_sets=True), timeout=5)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        b.restart()
        warnings = [
            ln for ln in b.read_log().splitlines() if '"warning"' in ln and "(--insecure)" in ln
        ]
        assert len(warnings) == 2, b.read_log()
    finally:
        b.cleanup()
