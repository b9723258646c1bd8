"""TCP transport security: mutual TLS with certificates reloaded while serving.

A TCP caller has no kernel to vouch for it, so its identity is its client certificate,
checked against --tls-client-ca (require_client_auth). Plain TCP is allowed only on a
loopback address and only with --insecure, which is logged at every start.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger("pasid_broker")


class TransportError(Exception):
    """The TCP listener's settings are unsafe or incomplete; the message says which."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the broker's certificate chain and key, and the CA its clients' are
    signed by."""

    cert: str
    key: str
    client_ca: str

    def paths(self) -> tuple[Path, Path, Path]:
        return Path(self.cert), Path(self.key), Path(self.client_ca)


def split_host(listen: str) -> str:
    """ "127.0.0.1:7000" -> "127.0.0.1", "[::1]:7000" -> "::1", "localhost:0" -> "localhost"."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise TransportError(f"--listen {listen!r} is not HOST:PORT")
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback(host: str) -> bool:
    """True if every address `host` names is a loopback one (127/8, ::1)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addrs = {str(info[4][0]) for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def check_listener(listen: str, tls: TlsFiles | None, insecure: bool) -> None:
    """The rules for --listen: TLS anywhere; plain TCP only on loopback with --insecure."""
    if not listen:
        return
    host = split_host(listen)
    if tls is not None:
        if insecure:
            raise TransportError("--insecure and --tls-cert exclude each other; choose one")
        return
    if not is_loopback(host):
        raise TransportError(
            f"--listen {listen} is not a loopback address and has no TLS: give --tls-cert,"
            " --tls-key and --tls-client-ca (clients then need certificates)"
        )
    if not insecure:
        raise TransportError(
            f"--listen {listen} without TLS needs --insecure (any local user could then"
            " act on this broker over TCP), or give --tls-cert, --tls-key and --tls-client-ca"
        )


def tls_files(cert: str, key: str, client_ca: str) -> TlsFiles | None:
    """All three or none: a TLS listener that does not check clients is not offered."""
    given = [
        n
        for n, v in (("--tls-cert", cert), ("--tls-key", key), ("--tls-client-ca", client_ca))
        if v
    ]
    if not given:
        return None
    if len(given) < 3:
        missing = {"--tls-cert", "--tls-key", "--tls-client-ca"} - set(given)
        raise TransportError(f"TLS needs {', '.join(sorted(missing))} too (mutual TLS only)")
    return TlsFiles(cert, key, client_ca)


class CertificateReloader:
    """grpc's certificate fetcher: called at each new TLS handshake, it re-reads the
    files when one changed (mtime, size or inode), so a rotation needs no restart.

    Replace the files by rename (as cert-manager and certbot do): a half-written file is
    refused and the previous certificate stays in use, with an error logged once.
    """

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._seen = self._signature()
        self.reloads = 0

    def _signature(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for p in self.files.paths():
            try:
                st = p.stat()
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append((0, 0, 0))
        return tuple(out)

    def load(self) -> grpc.ServerCertificateConfiguration:
        """The current files as a grpc configuration; TransportError if unreadable."""
        cert, key, ca = self.files.paths()
        try:
            chain, pkey, roots = cert.read_bytes(), key.read_bytes(), ca.read_bytes()
        except OSError as exc:
            raise TransportError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from None
        for path, data in ((cert, chain), (key, pkey), (ca, roots)):
            if b"-----BEGIN " not in data:
                raise TransportError(f"TLS file {path} holds no PEM block")
        return grpc.ssl_server_certificate_configuration([(pkey, chain)], root_certificates=roots)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        """None keeps the configuration in use (grpc's contract for the fetcher)."""
        sig = self._signature()
        with self._lock:
            if sig == self._seen:
                return None
            self._seen = sig
            try:
                config = self.load()
            except TransportError as exc:
                log.error("TLS files changed but cannot be used; keeping the previous: %s", exc)
                return None
            self.reloads += 1
        log.info("TLS certificates reloaded", extra={"cert": self.files.cert})
        return config


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Mutual TLS: the client must present a certificate signed by --tls-client-ca."""
    reloader = CertificateReloader(files)
    return grpc.dynamic_ssl_server_credentials(
        reloader.load(), reloader, require_client_authentication=True
    )


def insecure_warning(listen: str) -> None:
    """Logged at every start with --insecure: plain TCP has no caller identity."""
    log.warning(
        "plain TCP on %s (--insecure): callers are not identified; every local user can"
        " open sessions here as the shared 'anonymous' identity",
        listen,
        extra={"listen": listen},
    )
