"""The daemon's life: lock, start the engine, serve, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc

from broker import backends
from broker.backends.iommufd import IommufdBackend
from broker.config import Config
from broker.core import ANONYMOUS, PasidError, uid_identity
from broker.engine import Broker
from broker.engine import Session as BrokerSession
from broker.metrics import Metrics
from broker.peer import PeerIdentity, PeerServer, TicketBook
from broker.peer import TicketError as PeerTicketError
from broker.peer.handshake import FdCheck, Refused
from broker.service.authz import AdminPolicy, Authorizer, TicketError
from broker.service.instance import InstanceLock, StartupError, gid_of, preflight
from broker.service.limits import Admission
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
from broker.systemd import Notifier

log = logging.getLogger("pasid_broker")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PasidBroker"].full_name


__all__ = ["StartupError", "serve", "server_options"]


class UnixListener:
    """A Unix socket that no one can reach before it has its final mode and group, and
    that the broker removes at the end only if it is still the one it bound.

    grpc binds under the process umask and offers no mode, so the socket is bound inside
    a directory only the broker can enter (mkdtemp: 0700) beside its final path, given
    its mode and group there, and renamed into place once the server listens: there is no
    instant at which the final path accepts a connection with a wider mode. grpc unlinks
    the path it bound when it stops, whatever file is there by then; the private path is
    empty by then, and the final one is unlinked here only if its inode is ours.
    """

    def __init__(self, path: Path, mode: int, group: str = "") -> None:
        self.path = path
        self.mode = mode
        self.group = group
        self._private: Path | None = None
        self._ident: tuple[int, int] | None = None

    def bind(self, server: grpc.aio.Server) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._private = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        staged = self._private / "s"
        _bind(server, f"unix:{staged}")
        set_mode_and_group(staged, self.mode, self.group)

    def publish(self) -> None:
        """Move the listening socket to its final path (replacing a stale one)."""
        assert self._private is not None
        os.rename(self._private / "s", self.path)
        st = os.stat(self.path)
        self._ident = (st.st_dev, st.st_ino)
        self._cleanup_private()

    def _cleanup_private(self) -> None:
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
            self._private = None

    def close(self) -> None:
        self._cleanup_private()
        if self._ident is None:
            return
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) != self._ident:
            log.warning(
                "not removing %s: it is no longer this broker's socket",
                self.path,
                extra={"socket": str(self.path)},
            )
            return
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


def set_mode_and_group(path: Path, mode: int, group: str) -> None:
    """chmod, and chgrp to --socket-group: refused in one line (the broker must be a
    member of the group to give it a file)."""
    try:
        os.chmod(path, mode)
        if group:
            os.chown(path, -1, gid_of(group))
    except OSError as exc:
        hint = " (the broker must be a member: SupplementaryGroups=)" if exc.errno == 1 else ""
        raise StartupError(
            f"cannot give socket {path} mode 0{mode:o} and group {group or '-'}: "
            f"{exc.strerror}{hint}"
        ) from None


def _probe_tcp(address: str) -> None:
    """Resolve and trial-bind HOST:PORT ourselves: grpc's own failure is a C-core log line
    plus an exception, where an operator needs one line naming the cause."""
    host_text, _, port = address.rpartition(":")
    host = host_text.strip("[]") or None
    try:
        infos = socket.getaddrinfo(
            host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {address}: host {host}: {exc.strerror}") from None
    family, kind, proto, _, sockaddr = infos[0]
    try:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(sockaddr)
    except OSError as exc:
        raise StartupError(f"cannot listen on {address}: {exc.strerror}") from None


def _bind(
    server: grpc.aio.Server, address: str, creds: grpc.ServerCredentials | None = None
) -> int:
    """add_insecure_port / add_secure_port, refusing in one line (grpc raises
    RuntimeError or returns 0)."""
    try:
        port = (
            server.add_insecure_port(address)
            if creds is None
            else server.add_secure_port(address, creds)
        )
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {address}: {exc}") from None
    if port == 0:
        raise StartupError(f"cannot listen on {address} (address in use, or host unknown)")
    if not address.startswith("unix:") and address.rsplit(":", 1)[1] not in ("0", str(port)):
        raise StartupError(f"asked to listen on {address}, grpc bound port {port}")
    return int(port)


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
    return uid_identity(sess.holder.uid) if sess.holder is not None else ANONYMOUS


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
    """Run the broker until SIGTERM; 0 after a clean stop. StartupError (and the engine's
    RecoveryError) if it cannot start: __main__ prints it as one line and exits 2."""
    # Nothing the broker creates is for others (the database names clients and holds
    # token hashes): files are born 0600 whatever umask we were started under; sockets
    # are then given their configured mode (UnixListener).
    os.umask(0o077)
    notifier = Notifier.from_env()
    notifier.status("starting")
    try:
        tls, policy = check_transport(config)
        # Every TCP address before anything else is opened or logged.
        for addr in (config.listen, config.health_address):
            if addr not in ("", "off"):
                _probe_tcp(addr)
        # Before anything is bound: check the directories, then take the instance locks.
        preflight(config.db, config.unix_sockets())
        lock = InstanceLock.acquire(config.db, config.unix_sockets())
    except StartupError as exc:
        notifier.status(f"cannot start: {exc}")
        raise
    try:
        return await _serve_locked(config, notifier, tls, policy)
    except Exception as exc:
        notifier.status(f"failed: {exc}")
        raise
    finally:
        lock.close()


async def _serve_locked(
    config: Config, notifier: Notifier, tls: TlsFiles | None, policy: AdminPolicy
) -> int:
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
    except (OSError, ValueError, OverflowError) as exc:
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
    ] = [(server, None, [UnixListener(sock, config.socket_mode, config.socket_group)])]
    admin_servicer: PasidBrokerServicer | None = None
    if config.admin_socket_path:
        admin_servicer = make_servicer(admin=True)
        admin = _grpc_server(
            config,
            admin_servicer,
            health_servicer,
            metrics,
            unix_authz,
            PasidAdminServicer(broker, admin_servicer),
        )
        servers.append((admin, None, [UnixListener(Path(config.admin_socket_path), 0o600)]))
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
    probe: grpc.aio.Server | None = None
    if config.health_address not in ("", "off"):
        # Health alone on TCP, for probes that cannot reach a Unix socket (Kubernetes).
        probe = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probe)
        servers.append((probe, (config.health_address, None), []))
    health_address = "off"
    peer_path = config.peer_socket_path
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

    started: list[grpc.aio.Server] = []
    peer_started = recovering = False
    watchdog = asyncio.create_task(notifier.watchdog())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        for srv, tcp_bind, socks in servers:
            for listener in socks:
                listener.bind(srv)
            if tcp_bind is not None:
                addr, creds = tcp_bind
                port = _bind(srv, addr, creds)
                bound = f"{addr.rpartition(':')[0]}:{port}"
                if srv is probe:
                    health_address = bound
                else:  # the port picked for ":0" (tests, and operators who ask for any)
                    addresses.append(bound)
            await srv.start()
            started.append(srv)
            for listener in socks:
                listener.publish()
        try:
            peer.start()
            peer_started = True
        except OSError as exc:
            raise StartupError(f"cannot listen on peer socket {peer_path}: {exc}") from None
        if config.socket_group:
            set_mode_and_group(Path(peer_path), config.socket_mode, config.socket_group)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # Listening before recovery lets health checks say NOT_SERVING while it runs.
        notifier.status("recovering the database and the backend")
        recovering = True
        await broker.start()
        for sess in broker.sessions():  # recovered sets count against their holders
            admission.restore(sess.session_id, identity_of_holder(sess))
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        serving_backend = broker.caps.name if broker.caps else config.backend
        log.info(
            "serving",
            extra={
                "addresses": ",".join(addresses),
                "admin": config.admin_socket_path or "off",
                "peer_socket": peer_path,
                "anonymous": config.anonymous,
                "tcp": "off" if not config.listen else ("mutual TLS" if tls else "insecure"),
                # The backend actually serving: a --vfio-fallback may have replaced vfio.
                "backend": serving_backend,
                "db": config.db,
                "metrics_url": metrics_url or "off",
                "nofile": nofile[0],
                "health_address": health_address,
            },
        )
        notifier.ready(f"serving on {','.join(addresses)} ({serving_backend} backend)")
        await stop.wait()
        log.info("draining", extra={"seconds": config.drain_seconds})
        notifier.stopping(f"draining in-flight calls for up to {config.drain_seconds:g} s")
        broker.stopping = True
        broker.end_watches()
        await health_servicer.enter_graceful_shutdown()
        for s in (servicer, admin_servicer):
            if s is not None:
                s.shutdown()
        await asyncio.gather(*(srv.stop(config.drain_seconds) for srv in started))
    finally:
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
        for srv in started:
            await srv.stop(0)
        if peer_started:
            await peer.close()
        if recovering:
            await broker.stop()
        metrics.close()
        for _, _, socks in servers:
            for listener in socks:
                listener.close()
    log.info("stopped")
    return 0
