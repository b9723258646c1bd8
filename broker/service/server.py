"""The daemon's life: lock, start the engine, serve, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc

from broker import backends
from broker.config import Config
from broker.engine import Broker
from broker.service.servicer import PasidBrokerServicer
from broker.store import SqliteStore

log = logging.getLogger("pasid_broker")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PasidBroker"].full_name


class StartupError(Exception):
    """The broker cannot start; the message says why and what to do."""


def acquire_lock(db: str) -> IO[str]:
    """Hold PATH.lock for the daemon's life: a second broker on one db refuses to start.

    grpc silently replaces an existing Unix socket, so the socket cannot be the lock.
    """
    path = Path(db + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    f = path.open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise StartupError(f"{db} is in use by {holder} (lock {path}); refusing to start") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


def server_options(config: Config) -> list[tuple[str, int]]:
    ka = int(config.keepalive_seconds * 1000)
    return [
        # A second daemon must not silently share a TCP port.
        ("grpc.so_reuseport", 0),
        # Find silent peers: ping every ka, drop after ka/2 without an answer. The ping
        # timeout defaults to 60 s once keepalive is on; set it, or a frozen client holds
        # its set for over a minute.
        ("grpc.keepalive_time_ms", ka),
        ("grpc.keepalive_timeout_ms", max(ka // 2, 1000)),
        ("grpc.http2.ping_timeout_ms", max(ka // 2, 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Let clients ping as often as every ka/2 without a too_many_pings GOAWAY.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", max(ka // 2, 1000)),
        ("grpc.http2.max_pings_without_data", 0),
    ]


async def serve(config: Config) -> int:
    lock = acquire_lock(config.db)
    backend = backends.create(
        config.backend, pasid_bits=config.pasid_bits, kernel_quota=config.kernel_quota
    )
    broker = Broker(
        backend,
        SqliteStore(config.db),
        quotas=config.quotas,
        reserved=config.reserved,
        quarantine=config.quarantine,
        max_grace=config.max_grace,
        restart_grace=config.restart_grace,
    )
    server = grpc.aio.server(options=server_options(config))
    pb_grpc.add_PasidBrokerServicer_to_server(PasidBrokerServicer(broker), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, not_serving)

    sock = Path(config.socket)
    sock.parent.mkdir(parents=True, exist_ok=True)
    addresses = [f"unix:{sock}"]
    if config.listen:
        addresses.append(config.listen)
    for addr in addresses:
        if server.add_insecure_port(addr) == 0:
            raise StartupError(f"cannot listen on {addr}")
    await server.start()
    os.chmod(sock, config.socket_mode)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        # Listening before recovery lets health checks say NOT_SERVING while it runs.
        await broker.start()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving",
            extra={"addresses": ",".join(addresses), "backend": config.backend, "db": config.db},
        )
        await stop.wait()
        log.info("draining", extra={"seconds": config.drain_seconds})
        broker.stopping = True
        await health_servicer.enter_graceful_shutdown()
        await server.stop(config.drain_seconds)
    finally:
        await server.stop(0)
        await broker.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        lock.close()
    log.info("stopped")
    return 0
