"""Where the broker listens: one rule for the library and pasidctl."""

from __future__ import annotations

import os

DEFAULT_SOCKET = "/run/pasid-broker/broker.sock"

KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    # Ping the broker so that a half-open TCP connection is noticed on both sides.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


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
