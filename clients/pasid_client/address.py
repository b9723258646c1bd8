"""Where the broker listens: one rule for the library and pasidctl."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

DEFAULT_SOCKET = "/run/pasid-broker/broker.sock"


def keepalive_options(seconds: float = 10.0) -> list[tuple[str, int]]:
    """Ping the broker every `seconds` so that a half-open TCP connection is noticed on
    both sides. The broker accepts pings down to half its own --keepalive-seconds."""
    ms = int(seconds * 1000)
    return [
        ("grpc.keepalive_time_ms", ms),
        ("grpc.keepalive_timeout_ms", max(ms // 2, 1000)),
        ("grpc.http2.ping_timeout_ms", max(ms // 2, 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def channel_options(target: str, keepalive_seconds: float = 10.0) -> list[tuple[str, int]]:
    """The library's channel options for `target`. Keepalive pings on TCP only: on a Unix
    socket the kernel reports a dead broker at once (the connection resets), and a ping
    left unanswered by a broker that is only stopped (SIGSTOP, a debugger, a slow disk)
    would end every stream after the ping timeout, which the broker cannot tell from the
    client's exit (issue 22).

    Reconnect backoff short and capped (gRPC's default grows to 120 s): a session waiting
    for its restarted broker connects within a second of its return (a local connect
    costs nothing; a TCP one is capped at 5 s)."""
    local = target.startswith("unix:")
    backoff = [
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000 if local else 5000),
    ]
    return backoff if local else backoff + keepalive_options(keepalive_seconds)


def resolve(address: str | None = None, socket: str | None = None) -> str:
    """A gRPC target: `address` ("unix:/p" or "host:port"), else `socket`, else
    $PASID_BROKER_ADDRESS, else $PASID_BROKER_SOCKET, else the daemon's default socket."""
    if address:
        return address
    if socket:
        return f"unix:{os.path.abspath(socket)}"
    env = os.environ.get("PASID_BROKER_ADDRESS")
    if env:
        return env
    sock = os.environ.get("PASID_BROKER_SOCKET", DEFAULT_SOCKET)
    return f"unix:{os.path.abspath(sock)}"


def resolve_admin(admin_socket: str | None = None, socket: str | None = None) -> str:
    """The admin socket: `admin_socket`, else $PASID_BROKER_ADMIN_SOCKET, else admin.sock
    beside the clients' socket (as the daemon places it by default)."""
    if admin_socket:
        return f"unix:{os.path.abspath(admin_socket)}"
    env = os.environ.get("PASID_BROKER_ADMIN_SOCKET")
    if env:
        return f"unix:{os.path.abspath(env)}"
    sock = socket or os.environ.get("PASID_BROKER_SOCKET", DEFAULT_SOCKET)
    return f"unix:{os.path.join(os.path.dirname(os.path.abspath(sock)), 'admin.sock')}"


@dataclass(frozen=True)
class Tls:
    """Mutual TLS for a TCP address: the CA the broker's certificate chains to, and this
    client's certificate and key (PEM file paths). The broker names the caller by the
    certificate's subject."""

    ca: str
    cert: str
    key: str

    def credentials(self) -> grpc.ChannelCredentials:
        """Raises OSError if a file cannot be read."""
        return grpc.ssl_channel_credentials(
            Path(self.ca).read_bytes(), Path(self.key).read_bytes(), Path(self.cert).read_bytes()
        )


TlsArg = Tls | tuple[str, str, str] | None


def tls_of(tls: TlsArg) -> Tls | None:
    """`tls` as given, a (ca, cert, key) tuple, or None; then $PASID_BROKER_TLS_CA,
    _CERT and _KEY when all three are set."""
    if isinstance(tls, Tls):
        return tls
    if tls is not None:
        return Tls(*tls)
    env = [os.environ.get(f"PASID_BROKER_TLS_{k}", "") for k in ("CA", "CERT", "KEY")]
    return Tls(*env) if all(env) else None
