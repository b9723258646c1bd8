"""The daemon's life: lock, start the engine, serve, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import resource
import shutil
import signal
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc

from broker import backends
from broker.backends.iommufd import IommufdBackend
from broker.config import Config, peer_socket_path
from broker.core import PasidError
from broker.engine import Broker
from broker.engine import Session as BrokerSession
from broker.metrics import Metrics
from broker.peer import PeerIdentity, PeerServer, TicketBook
from broker.peer import TicketError as PeerTicketError
from broker.peer.handshake import FdCheck, Refused
from broker.service.authz import AdminPolicy, Authorizer, TicketError
from broker.service.limits import ANONYMOUS, Admission, uid_key
from broker.service.servicer import PasidAdminServicer, PasidBrokerServicer
from broker.service.status import status_of
from broker.service.tls import (
    TlsFiles,
    TransportError,
    check_listener,
    insecure_warning,
    server_credentials,
    tls_files,
)
from broker.service.wire import MalformedRequests, TolerantDecoding
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
    # 0600 whatever the umask: it names the holder's pid, and nobody else needs it.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    f = os.fdopen(fd, "a+")
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


class UnixListener:
    """A Unix socket that no one can reach before it has its final mode.

    grpc binds under the process umask and offers no mode, so the socket is bound inside
    a directory only the broker can enter (mkdtemp: 0700) beside its final path, given
    its mode there, and renamed into place once the server listens: there is no instant
    at which the final path accepts a connection with a wider mode.
    """

    def __init__(self, path: Path, mode: int) -> None:
        self.path = path
        self.mode = mode
        self._private: Path | None = None

    def bind(self, server: grpc.aio.Server) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._private = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        staged = self._private / "s"
        if server.add_insecure_port(f"unix:{staged}") == 0:
            raise StartupError(f"cannot listen on unix:{self.path}")
        os.chmod(staged, self.mode)

    def publish(self) -> None:
        """Move the listening socket to its final path (replacing a stale one)."""
        assert self._private is not None
        os.rename(self._private / "s", self.path)
        self._cleanup_private()

    def _cleanup_private(self) -> None:
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
            self._private = None

    def close(self) -> None:
        self._cleanup_private()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one: every local session holds a pidfd
    and a connection, and running out stops even the health check. Returns (soft, hard).
    The systemd unit sets LimitNOFILE (deploy/systemd/pasid-broker.service)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError) as exc:
        log.warning(
            "cannot raise RLIMIT_NOFILE", extra={"soft": soft, "hard": hard, "error": str(exc)}
        )
        return soft, hard
    return want, hard


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
        # No request needs more than a few hundred bytes; a client name of megabytes
        # would otherwise be held, stored and listed (--max-request-bytes).
        ("grpc.max_receive_message_length", config.limits.max_request_bytes or -1),
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
    authorizer: Authorizer,
    admin: PasidAdminServicer | None = None,
    *,
    remote: bool = False,
) -> grpc.aio.Server:
    # The authorizer first: no servicer code (and no timer) runs for a refused call.
    # Then TolerantDecoding: a request that does not parse reaches the servicer's
    # boundary as wire.Malformed (counted, logged once per peer) instead of a traceback.
    server = grpc.aio.server(
        options=server_options(config, remote=remote),
        interceptors=[authorizer, TolerantDecoding(), metrics.rpc_timer()],
    )
    pb_grpc.add_PasidBrokerServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME]
    if admin is not None:
        pb_grpc.add_PasidAdminServicer_to_server(admin, server)
        names.append(pb.DESCRIPTOR.services_by_name["PasidAdmin"].full_name)
    reflection.enable_server_reflection(names, server)
    return server


def check_transport(config: Config) -> tuple[TlsFiles | None, AdminPolicy]:
    """Refuse unsafe or incomplete listener settings before anything is opened."""
    try:
        files = tls_files(config.tls_cert, config.tls_key, config.tls_client_ca)
        check_listener(config.listen, files, config.insecure)
        policy = AdminPolicy.from_config(config.admin_groups, config.admin_subjects)
    except (TransportError, ValueError) as exc:
        raise StartupError(str(exc)) from None
    if config.admin_subjects and files is None:
        raise StartupError("--admin-subject needs a TLS listener (--listen with --tls-*)")
    return files, policy


def identity_of_holder(sess: BrokerSession) -> str:
    """The identity key a set's stored, kernel-verified holder counts under."""
    return uid_key(sess.holder.uid) if sess.holder is not None else ANONYMOUS


def take_ticket(tickets: TicketBook) -> Callable[[str], PeerIdentity]:
    """The authorizer's view of the ticket book: a per-call ticket in `pasid-ticket`
    metadata, taken once; its errors in the authorizer's terms."""

    def take(ticket: str) -> PeerIdentity:
        try:
            return tickets.take(ticket)
        except PeerTicketError as exc:
            raise TicketError(str(exc)) from None

    return take


def iommufd_fd_checks(backend: IommufdBackend) -> dict[str, FdCheck]:
    """The handshake's early refusal of a delegated fd of the wrong kind (issue 14); the
    full checks (bound, dev_id, width, owner) run when the ticket opens its set."""

    def check(role: str) -> FdCheck:
        def run(fd: int, _request: Mapping[str, Any], _facts: object) -> None:
            try:
                backend.check_fd(role, fd)
            except PasidError as exc:
                raise Refused(status_of(exc).name, exc.message) from None

        return run

    return {"iommufd": check("iommufd"), "device": check("device")}


async def serve(config: Config) -> int:
    # Nothing the broker creates is for others (the database names clients and holds
    # token hashes): files are born 0600 whatever umask we were started under; sockets
    # are then given their configured mode (UnixListener).
    os.umask(0o077)
    tls, policy = check_transport(config)
    lock = acquire_lock(config.db)
    nofile = raise_nofile_limit()
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
    # Handshakes on the peer socket leave tickets here; OpenSession takes them, and so
    # does the authorizer for a call's `pasid-ticket` metadata.
    tickets = TicketBook(config.ticket_seconds)
    broker = Broker(
        metrics.instrument(backend),
        store,
        quotas=config.quotas,
        reserved=config.reserved,
        quarantine=config.quarantine,
        max_grace=config.max_grace,
        restart_grace=config.restart_grace,
        identity_share=config.identity_share,
        tickets=tickets,
        anonymous=config.anonymous,
        watch_buffer=config.limits.watch_buffer,
        devices=backend if isinstance(backend, IommufdBackend) else None,
    )
    # Metrics observe the engine (commits, set ends, recovery); the engine knows no
    # metric names. RPCs are timed by the interceptor, stream ops by the servicer's hook.
    broker.observers.subscribe(metrics)
    # Limits count per identity across both sockets; a session stops counting when its
    # set's destroy is durable, whoever destroyed it.
    admission = Admission(config.limits, watchers_changed=metrics.watchers_open)
    broker.observers.subscribe(admission)
    malformed = MalformedRequests(metrics.malformed_request)

    def make_servicer(admin: bool) -> PasidBrokerServicer:
        return PasidBrokerServicer(
            broker,
            admin=admin,
            session_op_done=metrics.session_op_done,
            admission=admission,
            malformed=malformed,
            limit_refused=metrics.limit_refused,
        )

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
    servicer = make_servicer(admin=False)
    health_servicer = health.aio.HealthServicer()
    # On the Unix sockets a caller shows who it is with a peer ticket in the call's
    # metadata (the client library does the handshake); without one it is anonymous.
    unix_authz = Authorizer("unix", policy, take_ticket(tickets))
    server = _grpc_server(config, servicer, health_servicer, metrics, unix_authz)
    sock = Path(config.socket)
    addresses = [f"unix:{sock}"]
    # (server, TCP address and credentials or None, Unix listeners)
    servers: list[
        tuple[grpc.aio.Server, tuple[str, grpc.ServerCredentials | None] | None, list[UnixListener]]
    ] = [(server, None, [UnixListener(sock, config.socket_mode)])]
    admin_servicer: PasidBrokerServicer | None = None
    if config.admin_socket:
        admin_servicer = make_servicer(admin=True)
        admin = _grpc_server(
            config,
            admin_servicer,
            health_servicer,
            metrics,
            unix_authz,
            PasidAdminServicer(broker, admin_servicer),
        )
        servers.append((admin, None, [UnixListener(Path(config.admin_socket), 0o600)]))
    if config.listen:
        # Its own server, so that its interceptor knows the transport. With TLS it serves
        # PasidAdmin too, to --admin-subject certificates only (checked per call).
        if tls is not None:
            tcp_authz = Authorizer("tls", policy)
            try:
                creds: grpc.ServerCredentials | None = server_credentials(tls)
            except TransportError as exc:
                raise StartupError(str(exc)) from None
        else:
            tcp_authz, creds = Authorizer("tcp", policy), None
            insecure_warning(config.listen)
        tcp = _grpc_server(
            config,
            servicer,
            health_servicer,
            metrics,
            tcp_authz,
            PasidAdminServicer(broker, servicer) if tls is not None else None,
            remote=True,  # keepalive pings: a remote peer has no pidfd
        )
        servers.append((tcp, (config.listen, creds), []))
    peer_path = peer_socket_path(config.peer_socket, config.socket)
    # Bound under umask 077 and chmod-ed before listen(): no connection before its mode.
    peer = PeerServer(
        peer_path,
        tickets,
        mode=config.socket_mode,
        fd_checks=iommufd_fd_checks(backend) if isinstance(backend, IommufdBackend) else None,
    )
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, not_serving)

    try:
        for srv, tcp_bind, socks in servers:
            for listener in socks:
                listener.bind(srv)
            if tcp_bind is not None:
                addr, creds = tcp_bind
                port = (
                    srv.add_insecure_port(addr)
                    if creds is None
                    else srv.add_secure_port(addr, creds)
                )
                if port == 0:
                    raise StartupError(f"cannot listen on {addr}")
                # Log the port picked for ":0" (tests, and operators who ask for any).
                addresses.append(f"{addr.rpartition(':')[0]}:{port}")
            await srv.start()
            for listener in socks:
                listener.publish()
    except BaseException:
        for _, _, socks in servers:
            for listener in socks:
                listener.close()
        raise
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
        for sess in broker.sessions():  # recovered sets count against their holders
            admission.restore(sess.session_id, identity_of_holder(sess))
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving",
            extra={
                "addresses": ",".join(addresses),
                "admin": config.admin_socket or "off",
                "peer_socket": peer_path,
                "anonymous": config.anonymous,
                "tcp": "off" if not config.listen else ("mutual TLS" if tls else "insecure"),
                # The backend actually serving: a --vfio-fallback may have replaced vfio.
                "backend": broker.caps.name if broker.caps else config.backend,
                "db": config.db,
                "metrics_url": metrics_url or "off",
                "nofile": nofile[0],
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
            for listener in socks:
                listener.close()
        lock.close()
    log.info("stopped")
    return 0
