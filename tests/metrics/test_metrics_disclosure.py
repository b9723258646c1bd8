"""Issue 20, point 8: /metrics named tenants (client names, pids, uids of the top
holders) to whoever reached it. Now those series are served only with
--metrics-tenants, which by default ('auto') means only over HTTPS to scrapers with a
client certificate of --metrics-tls-client-ca, as admins are identified over TCP.

Real brokers and real scrapes: another uid (65534, setpriv) scraping a default broker,
and a scrape over TLS with a client certificate (tests/e2e/certs.py makes them).
"""

from __future__ import annotations

import ssl
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest
from pasid_client import Client

from tests.e2e.certs import CertAuthority
from tests.e2e.other_uid import SYSTEM_PYTHON, as_nobody, require_setpriv
from tests.harness import BrokerProcess, run_broker_once
from tests.metrics.scrape import scrape

TENANT_SERIES = {"pasid_broker_top_client_pasids", "pasid_broker_top_holder_pasids"}

# A scrape as another uid, with the system's python (standard library only).
NOBODY_SCRAPE = (
    "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())"
)


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[tuple[CertAuthority, Path, Path, Path]]:
    """A CA, the metrics listener's certificate, and one scraper's certificate."""
    ca = CertAuthority(tmp_path / "pki", "metrics ca")
    server = ca.issue("server", "localhost", server=True)
    scraper = ca.issue("prometheus", "prometheus", ou="monitoring")
    yield ca, server.cert, server.key, scraper.cert
    assert scraper.key.exists()


def _context(
    ca: CertAuthority, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.path))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def test_another_uid_scraping_a_default_broker_sees_no_tenant() -> None:
    """The default: plain HTTP on loopback, no series naming a client, pid or uid."""
    require_setpriv()
    b = BrokerProcess().start()
    try:
        with Client(b.address) as c, c.session("secret-tenant-vm", grace_seconds=60) as s:
            s.alloc(1, 100, count=3)
            p = as_nobody([SYSTEM_PYTHON, "-c", NOBODY_SCRAPE, b.metrics_url], stdout=-1, stderr=-1)
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            assert "pasid_broker_pasids_in_use 3.0" in out  # the totals are served
            assert "secret-tenant-vm" not in out
            assert not any(name in out for name in TENANT_SERIES), out
    finally:
        b.cleanup()


def test_tenant_series_over_tls_to_a_client_certificate_only(
    pki: tuple[CertAuthority, Path, Path, Path],
) -> None:
    ca, cert, key, scraper = pki
    b = BrokerProcess(
        "--metrics-tls-cert",
        str(cert),
        "--metrics-tls-key",
        str(key),
        "--metrics-tls-client-ca",
        str(ca.path),
    ).start()
    try:
        url = b.metrics_url
        assert url.startswith("https://127.0.0.1:")
        with Client(b.address) as c, c.session("vm-over-tls", grace_seconds=60) as s:
            s.alloc(1, 100, count=2)
            m = scrape(url, context=_context(ca, scraper, scraper.with_suffix(".key")))
            assert m.value("pasid_broker_top_client_pasids", client="vm-over-tls") == 2
            assert {f for f in m.families} >= TENANT_SERIES
            # No client certificate, or plain HTTP: refused at the handshake, no metrics.
            with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
                scrape(url, context=_context(ca))
            with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
                scrape(url.replace("https://", "http://"))
            # A certificate of another CA: refused too.
            rogue = CertAuthority(ca.dir / "rogue", "rogue ca").issue("p", "prometheus")
            with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
                scrape(url, context=_context(ca, rogue.cert, rogue.key))
        assert b.proc is not None and b.proc.poll() is None
    finally:
        b.cleanup()


def test_tls_without_client_certificates_serves_no_tenant(
    pki: tuple[CertAuthority, Path, Path, Path],
) -> None:
    """HTTPS alone says nothing about who scrapes: 'auto' keeps the tenant series off."""
    ca, cert, key, _ = pki
    b = BrokerProcess("--metrics-tls-cert", str(cert), "--metrics-tls-key", str(key)).start()
    try:
        with Client(b.address) as c, c.session("vm", grace_seconds=60) as s:
            s.alloc(1, 100)
            m = scrape(b.metrics_url, context=_context(ca))
            assert m.value("pasid_broker_pasids_in_use") == 1
            assert not TENANT_SERIES & set(m.families)
    finally:
        b.cleanup()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--metrics-tls-key", "/k.pem"], "need --metrics-tls-cert"),
        (["--metrics-tls-cert", "/c.pem"], "--metrics-tls-cert needs --metrics-tls-key"),
        (
            [
                *("--metrics-address", "127.0.0.1:0"),
                *("--metrics-tls-cert", "/nonexistent.pem", "--metrics-tls-key", "/no.key"),
            ],
            "cannot serve metrics",
        ),
    ],
)
def test_incomplete_metrics_tls_refuses_to_start(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    r = run_broker_once(
        "--db", str(tmp_path / "b.db"), "--socket", str(tmp_path / "b.sock"), *flags
    )
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
