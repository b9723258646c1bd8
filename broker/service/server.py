"""The daemon's life: lock, start the engine, serve, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import resource
import signal
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc

from broker import backends
from broker.config import Config, peer_socket_path
from broker.engine import Broker
from broker.metrics import Metrics
from broker.peer import PeerServer, TicketBook
from broker.service.servicer import PasidAdminServicer, PasidBrokerServicer
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


def server_options(config: Config, *, remote: bool) -> list[tuple[str, int]]:
    """gRPC server options. Keepalive pings only where the peer is remote (TCP).

    The liveness rule (docs/peer-identity.md): a local client ends with its process or
    its stream, never because it stopped answering pings. A SIGSTOPped VMM (paused,
    under a debugger, frozen by CRIU) answers nothing, yet the kernel keeps its set; so
    the Unix socket's server sends no pings. Remote peers have no pidfd, and a half-open
    TCP connection is only found by pinging: that server pings.
    """
    ka = int(config.keepalive_seconds * 1000)
    opts = [
        # A second daemon must not silently share a TCP port.
        ("grpc.so_reuseport", 0),
        # Accept client pings as often as every ka/2 on idle streams (a VMM's session is
        # idle for hours): with grpc's default (5 min) an idle client pinging every 10 s
        # is sent GOAWAY too_many_pings after two strikes, and its set would be destroyed.
        ("grpc.http2.min_ping_interval_without_data_ms", max(ka // 2, 500)),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if remote:
        # Find silent peers: ping every ka, drop after ka/2 without an answer. The ping
        # timeout defaults to 60 s once keepalive is on; set it, or a dead remote client
        # holds its set for over a minute.
        opts += [
            ("grpc.keepalive_time_ms", ka),
            ("grpc.keepalive_timeout_ms", max(ka // 2, 1000)),
            ("grpc.http2.ping_timeout_ms", max(ka // 2, 1000)),
        ]
    else:
        # grpc's default keepalive_time for servers is 2 h: make "never" explicit.
        opts += [("grpc.keepalive_time_ms", 2**31 - 1)]
    return opts


def _grpc_server(
    config: Config,
    servicer: PasidBrokerServicer,
    health_servicer: health.aio.HealthServicer,
    metrics: Metrics,
    *,
    remote: bool = False,
) -> grpc.aio.Server:
    server = grpc.aio.server(
        options=server_options(config, remote=remote), interceptors=[metrics.rpc_timer()]
    )
    pb_grpc.add_PasidBrokerServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME]
    if servicer.admin:
        names.append(pb.DESCRIPTOR.services_by_name["PasidAdmin"].full_name)
    reflection.enable_server_reflection(names, server)
    return server


def raise_fd_limit() -> None:
    """Each verified session holds its holder's pidfd (and each unused ticket one): lift
    the soft RLIMIT_NOFILE to the hard one, as daemons holding many fds do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(config: Config) -> int:
    lock = acquire_lock(config.db)
    raise_fd_limit()
    metrics = Metrics()
    backend: backends.Backend = backends.create(
        config.backend,
        pasid_bits=config.pasid_bits,
        kernel_quota=config.kernel_quota,
        vfio_groups=config.vfio_groups,
        vfio_pasid_bits=config.vfio_pasid_bits,
        vfio_fallback=config.vfio_fallback,
    )
    store = SqliteStore(config.db, event_retention=config.event_retention)
    # Handshakes on the peer socket leave tickets here; OpenSession takes them.
    tickets = TicketBook(config.ticket_seconds)
    broker = Broker(
        metrics.instrument(backend),
        store,
        quotas=config.quotas,
        reserved=config.reserved,
        quarantine=config.quarantine,
        max_grace=config.max_grace,
        restart_grace=config.restart_grace,
        tickets=tickets,
        anonymous=config.anonymous,
    )
    # Metrics observe the engine (commits, set ends, recovery); the engine knows no
    # metric names. RPCs are timed by the interceptor, stream ops by the servicer's hook.
    broker.observers.subscribe(metrics)
    # Metrics: bound before gRPC so that a taken port refuses the start cleanly.
    metrics.bind(broker, asyncio.get_running_loop())
    try:
        metrics_url = metrics.serve(config.metrics_address)
    except (OSError, ValueError) as exc:
        lock.close()
        raise StartupError(
            f"cannot serve metrics on {config.metrics_address}: {exc}"
            " (choose another --metrics-address, or 'off')"
        ) from None
    servicer = PasidBrokerServicer(broker, session_op_done=metrics.session_op_done)
    health_servicer = health.aio.HealthServicer()
    server = _grpc_server(config, servicer, health_servicer, metrics)
    sock = Path(config.socket)
    addresses = [f"unix:{sock}"] + ([config.listen] if config.listen else [])
    servers = [(server, [f"unix:{sock}"], [(sock, config.socket_mode)])]
    if config.listen:  # its own server: keepalive pings for remote peers only
        tcp = _grpc_server(config, servicer, health_servicer, metrics, remote=True)
        servers.append((tcp, [config.listen], []))
    admin_servicer: PasidBrokerServicer | None = None
    if config.admin_socket:
        admin_servicer = PasidBrokerServicer(
            broker, admin=True, session_op_done=metrics.session_op_done
        )
        admin = _grpc_server(config, admin_servicer, health_servicer, metrics)
        pb_grpc.add_PasidAdminServicer_to_server(PasidAdminServicer(broker, admin_servicer), admin)
        admin_sock = Path(config.admin_socket)
        servers.append((admin, [f"unix:{admin_sock}"], [(admin_sock, 0o600)]))
    peer_path = peer_socket_path(config.peer_socket, config.socket)
    peer = PeerServer(peer_path, tickets, mode=config.socket_mode)
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, not_serving)

    for srv, addrs, socks in servers:
        for path, _mode in socks:
            path.parent.mkdir(parents=True, exist_ok=True)
        for addr in addrs:
            port = srv.add_insecure_port(addr)
            if port == 0:
                raise StartupError(f"cannot listen on {addr}")
            if addr == config.listen and addr.endswith(":0"):  # log the port it picked
                addresses[addresses.index(addr)] = f"{addr[:-2]}:{port}"
        await srv.start()
        for path, mode in socks:
            os.chmod(path, mode)
    try:
        peer.start()
    except OSError as exc:
        raise StartupError(f"cannot listen on peer socket {peer_path}: {exc}") from None

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
            extra={
                "addresses": ",".join(addresses),
                "admin": config.admin_socket or "off",
                "peer_socket": peer_path,
                "anonymous": config.anonymous,
                # The backend actually serving: a --vfio-fallback may have replaced vfio.
                "backend": broker.caps.name if broker.caps else config.backend,
                "db": config.db,
                "metrics_url": metrics_url or "off",
            },
        )
        await stop.wait()
        log.info("draining", extra={"seconds": config.drain_seconds})
        broker.stopping = True
        broker.end_watches()
        await health_servicer.enter_graceful_shutdown()
        for s in (servicer, admin_servicer):
            if s is not None:
                s.shutdown()
        await asyncio.gather(*(srv.stop(config.drain_seconds) for srv, _, _ in servers))
    finally:
        for srv, _, _ in servers:
            await srv.stop(0)
        await peer.close()
        await broker.stop()
        metrics.close()
        for _, _, socks in servers:
            for path, _mode in socks:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        lock.close()
    log.info("stopped")
    return 0
