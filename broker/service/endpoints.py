"""The daemon's gRPC servers, built before any of them listens: the clients' Unix socket,
the admin socket, the TCP listener (mutual TLS or loopback-insecure) and the health-only
TCP probe; then bound, started and published in that order, and drained on SIGTERM."""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc

from broker.config import Config
from broker.engine import Broker
from broker.metrics import Metrics
from broker.peer import PeerIdentity
from broker.service.admin import PasidAdminServicer
from broker.service.authz import AdminPolicy, Authorizer
from broker.service.instance import StartupError
from broker.service.listeners import UnixListener, bind_port
from broker.service.servicer import PasidBrokerServicer
from broker.service.tls import (
    TlsFiles,
    TransportError,
    check_listener,
    insecure_warning,
    server_credentials,
    tls_files,
)
from broker.service.wire import TolerantDecoding

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PasidBroker"].full_name


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


# A local client sends the HTTP/2 preface within milliseconds of connecting; one that
# sends nothing holds a descriptor only this long (grpc's default is 120 s).
HANDSHAKE_TIMEOUT_MS = 10_000


def connection_cap(fd_reserve: int) -> int:
    """Connections the clients' socket may hold at once: half of the descriptors left
    after `fd_reserve` (RLIMIT_NOFILE, raised at start), since each local session also
    holds a pidfd, and a connection can carry many sessions. The reserve keeps the
    admin socket, the peer handshake, the database and the metrics listener working
    however many connections one uid opens (issue 20, point 4)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(64, (soft - fd_reserve) // 2)


def clients_socket_options(config: Config) -> list[tuple[str, int]]:
    """What bounds the descriptors connections to the clients' socket hold: grpc gives
    no SO_PEERCRED per connection, so no per-uid cap is possible without a proxy in the
    accept path; instead a cap in all (beyond it, connections wait in the listen backlog,
    holding none of the broker's descriptors), a short handshake timeout, and idle
    connections (no call open) closed after --connection-idle-seconds."""
    opts = [
        ("grpc.max_allowed_incoming_connections", connection_cap(config.fd_reserve)),
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
    ]
    if config.connection_idle_seconds:
        opts.append(("grpc.max_connection_idle_ms", _ms(config.connection_idle_seconds)))
    return opts


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
        # A TLS identity is checked at the handshake only: without an age, a connection
        # kept open kept its certificate's rights after the certificate was revoked or
        # its CA rotated out (issue 20, point 9). grpc jitters the age by +-10%.
        opts += [
            ("grpc.max_connection_age_ms", _ms(config.tls_max_connection_age)),
            ("grpc.max_connection_age_grace_ms", _ms(config.tls_max_connection_age_grace)),
        ]
    else:
        # grpc's default keepalive_time for servers is 2 h: make "never" explicit.
        opts += [("grpc.keepalive_time_ms", 2**31 - 1)]
    return opts


def _ms(seconds: float) -> int:
    """A grpc channel argument in ms (an int32)."""
    return max(0, min(int(seconds * 1000), 2**31 - 1))


def _grpc_server(
    config: Config,
    servicer: PasidBrokerServicer,
    health_servicer: health.aio.HealthServicer,
    metrics: Metrics,
    authorizer: Authorizer,
    admin: PasidAdminServicer | None = None,
    *,
    remote: bool = False,
    options: list[tuple[str, int]] | None = None,
) -> grpc.aio.Server:
    # The authorizer first: no servicer code (and no timer) runs for a refused call.
    # Then TolerantDecoding: a request that does not parse reaches the servicer's
    # boundary as wire.Malformed (counted, logged once per peer) instead of a traceback.
    server = grpc.aio.server(
        options=server_options(config, remote=remote) + (options or []),
        interceptors=[authorizer, TolerantDecoding(), metrics.rpc_timer()],
    )
    services = GenericOnly(server)
    pb_grpc.add_PasidBrokerServicer_to_server(servicer, services)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, services)
    names = [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME]
    if admin is not None:
        pb_grpc.add_PasidAdminServicer_to_server(admin, services)
        names.append(pb.DESCRIPTOR.services_by_name["PasidAdmin"].full_name)
    # What reflection.enable_server_reflection does for an aio server, through the same
    # adapter.
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer(names), services
    )
    return server


class GenericOnly:
    """Stands in for a grpc.aio server to the generated add_*Servicer_to_server: the
    handlers are added as generic handlers only, not as registered methods.

    grpc.aio (1.85) keeps one pending request-call future per registered method, plus one
    for the rest, and waits on all of them (asyncio.wait, in Python) for every call it
    accepts: with the broker's 10 or so methods that was a few microseconds per unary
    call, growing with the methods; the echo baseline registers none. Generic handlers
    are found by their service's dict, the same handlers either way.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        pass  # the same handlers arrived as a generic handler just before


@dataclass
class Endpoint:
    """One grpc server and where it listens: Unix sockets, or one TCP address."""

    server: grpc.aio.Server
    unix: list[UnixListener] = field(default_factory=list)
    tcp: str = ""
    creds: grpc.ServerCredentials | None = None
    health_only: bool = False  # the --health-address probe


# The health service name a liveness probe asks (Kubernetes: grpc.service: liveness).
# Readiness is "" and SERVICE_NAME; a slow disk turns them NOT_SERVING, never this one.
LIVENESS_SERVICE = "liveness"


@dataclass
class Endpoints:
    """Every gRPC server of the daemon, and what they share (health, servicers)."""

    health: health.aio.HealthServicer
    servicers: list[PasidBrokerServicer]
    all: list[Endpoint]
    started: list[grpc.aio.Server] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    health_address: str = "off"

    async def set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        """Readiness: "" and SERVICE_NAME (recovering, slow commits, a failed store).
        Set through server.set_ready only, which records it for pasid_broker_ready."""
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def set_liveness(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        """LIVENESS_SERVICE: SERVING from the moment the daemon listens, whether it is
        recovering or its disk is slow; NOT_SERVING only when it is about to exit."""
        await self.health.set(LIVENESS_SERVICE, status)

    async def listen(self) -> None:
        """Bind, start and publish each server in order; `started` says which to stop."""
        for ep in self.all:
            for listener in ep.unix:
                listener.bind(ep.server)
            if ep.tcp:
                port = bind_port(ep.server, ep.tcp, ep.creds)
                bound = f"{ep.tcp.rpartition(':')[0]}:{port}"
                if ep.health_only:
                    self.health_address = bound
                else:  # the port picked for ":0" (tests, and operators who ask for any)
                    self.addresses.append(bound)
            await ep.server.start()
            self.started.append(ep.server)
            for listener in ep.unix:
                listener.publish()

    async def drain(self, seconds: float) -> None:
        """SIGTERM: health says so, session streams end, in-flight calls get `seconds`."""
        await self.health.enter_graceful_shutdown()
        for s in self.servicers:
            s.shutdown()
        await asyncio.gather(*(srv.stop(seconds) for srv in self.started))

    async def close(self) -> None:
        for srv in self.started:
            await srv.stop(0)

    def remove_sockets(self) -> None:
        for ep in self.all:
            for listener in ep.unix:
                listener.close()


def build_endpoints(
    config: Config,
    broker: Broker,
    metrics: Metrics,
    make_servicer: Callable[[bool], PasidBrokerServicer],
    take_ticket: Callable[[str], PeerIdentity],
    tls: TlsFiles | None,
    policy: AdminPolicy,
) -> Endpoints:
    """The servers the configuration asks for, none listening yet."""
    servicer = make_servicer(False)
    health_servicer = health.aio.HealthServicer()
    # On the Unix sockets a caller shows who it is with a peer ticket in the call's
    # metadata (the client library does the handshake); without one it is anonymous.
    unix_authz = Authorizer("unix", policy, take_ticket)
    server = _grpc_server(
        config,
        servicer,
        health_servicer,
        metrics,
        unix_authz,
        options=clients_socket_options(config),
    )
    sock = Path(config.socket)
    endpoints = Endpoints(
        health_servicer,
        [servicer],
        [Endpoint(server, [UnixListener(sock, config.socket_mode, config.socket_group)])],
        addresses=[f"unix:{sock}"],
    )
    if config.admin_socket_path:
        admin_servicer = make_servicer(True)
        endpoints.servicers.append(admin_servicer)
        admin = _grpc_server(
            config,
            admin_servicer,
            health_servicer,
            metrics,
            unix_authz,
            PasidAdminServicer(broker, admin_servicer),
        )
        endpoints.all.append(Endpoint(admin, [UnixListener(Path(config.admin_socket_path), 0o600)]))
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
        endpoints.all.append(Endpoint(tcp, tcp=config.listen, creds=creds))
    if config.health_address not in ("", "off"):
        # Health alone on TCP, for probes that cannot reach a Unix socket (Kubernetes).
        probe = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probe)
        endpoints.all.append(Endpoint(probe, tcp=config.health_address, health_only=True))
    return endpoints
