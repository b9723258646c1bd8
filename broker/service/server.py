"""The daemon's life: start-up as one sequence, serve, drain on SIGTERM.

Start-up reads top to bottom in `serve` and `_run`, one step each, and every refusal
happens at the step that owns it: config (a bad value, an address or directory that
cannot work), locks (another broker), store (a database that is not one, or not ours),
recovery (a store that does not fit the backend), listeners (a socket or port that
cannot be bound), ready. The parts live beside it: endpoints.py (the gRPC servers),
listeners.py (sockets and ports), instance.py (locks, path checks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2

from broker import backends
from broker.backends.iommufd import IommufdBackend
from broker.config import Config
from broker.core import ANONYMOUS, PasidError, uid_identity
from broker.engine import Broker
from broker.engine import Session as BrokerSession
from broker.metrics import Metrics, MetricsTls, parse_address
from broker.peer import PeerIdentity, PeerServer, TicketBook
from broker.peer import TicketError as PeerTicketError
from broker.peer.handshake import FdCheck, Refused
from broker.service.authz import AdminPolicy, TicketError
from broker.service.endpoints import (
    SERVICE_NAME,
    Endpoints,
    build_endpoints,
    check_transport,
    server_options,
)
from broker.service.instance import InstanceLock, SocketPath, StartupError, preflight
from broker.service.limits import Admission
from broker.service.listeners import UnixListener, probe_tcp, set_mode_and_group
from broker.service.servicer import PasidBrokerServicer
from broker.service.status import status_of
from broker.service.tls import TlsFiles
from broker.service.wire import MalformedRequests
from broker.store import SqliteStore
from broker.store.sqlite import SYNCHRONOUS
from broker.systemd import Notifier

log = logging.getLogger("pasid_broker")

# Exit status after the store failed while serving (a failed fsync: StoreFailed). Not 2
# (a refusal, which systemd's RestartPreventExitStatus=2 does not restart): a restart
# recovers from what is durable, which is the point (docs/runbook.md).
EXIT_STORE_FAILED = 3

__all__ = [
    "SERVICE_NAME",
    "StartupError",
    "UnixListener",
    "check_transport",
    "serve",
    "server_options",
]


async def serve(config: Config) -> int:
    """Run the broker until SIGTERM; 0 after a clean stop. StartupError (or the store's
    and the engine's refusals) if it cannot start: __main__ prints it as one line and
    exits 2."""
    # Nothing the broker creates is for others (the database names clients and holds
    # token hashes): files are born 0600 whatever umask we were started under; sockets
    # are then given their configured mode (UnixListener).
    os.umask(0o077)
    notifier = Notifier.from_env()
    notifier.status("starting")
    try:
        # 1. config: every refusal that needs nothing opened.
        tls, policy = check_config(config)
        # 2. locks: another broker on this database or these sockets, named by its pid.
        lock = InstanceLock.acquire(
            config.db, config.unix_sockets(), admin_socket=config.admin_socket_path
        )
    except StartupError as exc:
        notifier.status(f"cannot start: {exc}")
        raise
    try:
        return await _run(config, notifier, tls, policy)
    except Exception as exc:
        notifier.status(f"failed: {exc}")
        raise
    finally:
        lock.close()


async def _run(
    config: Config, notifier: Notifier, tls: TlsFiles | None, policy: AdminPolicy
) -> int:
    """Steps 3 to 6 (store, recovery, listeners, ready), serving, and shut-down. Every
    server is built before any listens; health says NOT_SERVING until recovery is done."""
    nofile = raise_nofile_limit()
    engine = build_engine(config)
    endpoints = build_endpoints(
        config,
        engine.broker,
        engine.metrics,
        engine.make_servicer,
        take_ticket(engine.tickets),
        tls,
        policy,
    )
    peer = build_peer_server(config, engine)
    await set_ready(engine, endpoints, False)

    peer_started = store_open = False
    recovery: asyncio.Task[None] | None = None
    watchdog = asyncio.create_task(notifier.watchdog())
    readiness: asyncio.Task[None] | None = None
    stop = asyncio.Event()
    code = 0
    try:
        # 3. store: a file that is not a database, or not ours, refused before anything
        # is bound.
        notifier.status("opening the database")
        await engine.broker.open_store()
        store_open = True
        # 4. recovery: the backend, allocator and sessions, in a worker thread; it runs
        # on while the listeners are bound, so that health says NOT_SERVING meanwhile.
        notifier.status("recovering the database and the backend")
        recovery = asyncio.create_task(recover(engine))
        # 5. listeners: metrics first (a taken port refuses before gRPC binds), then
        # every gRPC server, then the peer handshake's socket.
        metrics_url = serve_metrics(config, engine)
        await endpoints.listen()
        await endpoints.set_liveness(health_pb2.HealthCheckResponse.SERVING)
        start_peer_server(config, peer)
        peer_started = True
        stop_on_signals(stop)
        # 6. ready: recovery done, health SERVING, READY to systemd.
        await recovery
        await set_ready(engine, endpoints, True)
        serving = announce(config, engine, endpoints, notifier, tls, metrics_url, nofile)
        readiness = asyncio.create_task(
            follow_commits(config, engine, endpoints, notifier, serving)
        )
        stop_on_store_failure(engine, stop)
        await stop.wait()
        readiness.cancel()
        if engine.broker.failure is not None:
            code = await store_failed(engine, endpoints, peer, notifier)
        else:
            await drain(config, engine, endpoints, peer, notifier)
    finally:
        if recovery is not None:
            # A listener refused while recovery ran: its thread cannot be cancelled, and
            # the store must not close under it (and its own error, if any, is taken).
            with contextlib.suppress(Exception):
                await recovery
        for task in (watchdog, readiness):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await endpoints.close()
        if peer_started:
            await peer.close()
        if store_open:
            await engine.broker.stop()
        engine.metrics.close()
        endpoints.remove_sockets()
    log.info("stopped", extra={"exit_status": code})
    return code


# -- the steps, in the order serve and _run take them ---------------------------------


def check_config(config: Config) -> tuple[TlsFiles | None, AdminPolicy]:
    """Step 1: every refusal that needs nothing opened: listener settings, TCP addresses,
    and the directories of the database and sockets."""
    tls, policy = check_transport(config)
    for addr in (config.listen, config.health_address):
        if addr not in ("", "off"):
            probe_tcp(addr)
    try:
        metrics = parse_address(config.metrics_address)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    metrics_tls(config)  # all its files named, or none
    if metrics is not None:
        host, port = metrics
        probe_tcp(
            f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
            refusal=f"cannot serve metrics on {config.metrics_address}",
            hint=" (choose another --metrics-address, or 'off')",
        )
    preflight(config.db, socket_paths(config))
    return tls, policy


def socket_paths(config: Config) -> list[SocketPath]:
    """The Unix sockets to bind, each with the flag that names it (or its default)."""
    mode, group = config.socket_mode, config.socket_group
    paths = [SocketPath("--socket", config.socket, mode, group)]
    if config.admin_socket_path:
        flag = "--admin-socket" if config.admin_socket else "the default --admin-socket"
        paths.append(SocketPath(flag, config.admin_socket_path, 0o600))  # PasidAdmin: owner only
    flag = "--peer-socket" if config.peer_socket else "the default --peer-socket"
    paths.append(SocketPath(flag, config.peer_socket_path, mode, group))
    return paths


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


@dataclass
class Engine:
    """The broker and what observes it, built before anything listens."""

    broker: Broker
    backend: backends.Backend
    metrics: Metrics
    tickets: TicketBook
    admission: Admission
    malformed: MalformedRequests

    def make_servicer(self, admin: bool) -> PasidBrokerServicer:
        return PasidBrokerServicer(
            self.broker,
            admin=admin,
            session_op_done=self.metrics.session_op_done,
            admission=self.admission,
            malformed=self.malformed,
            limit_refused=self.metrics.limit_refused,
        )


def build_engine(config: Config) -> Engine:
    metrics = Metrics()
    backend: backends.Backend = backends.create(
        config.backend,
        pasid_bits=config.pasid_bits,
        kernel_quota=config.kernel_quota,
        vfio_groups=config.vfio_groups,
        vfio_pasid_bits=config.vfio_pasid_bits,
        vfio_fallback=config.vfio_fallback,
    )
    store = SqliteStore(
        config.db,
        synchronous=SYNCHRONOUS[config.durability],
        event_retention=config.event_retention,
    )
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
        anonymous_quota=config.quota_anonymous,
        tickets=tickets,
        anonymous=config.anonymous,
        watch_buffer=config.limits.watch_buffer,
        devices=backend if isinstance(backend, IommufdBackend) else None,
        store_error_exit=config.store_error_exit_seconds,
    )
    # Metrics observe the engine (commits, set ends, recovery); the engine knows no
    # metric names. RPCs are timed by the interceptor, stream ops by the servicer's hook.
    broker.observers.subscribe(metrics)
    # Limits count per identity across both sockets; a session stops counting when its
    # set's destroy is durable, whoever destroyed it.
    admission = Admission(config.limits, watchers_changed=metrics.watchers_open)
    broker.observers.subscribe(admission)
    malformed = MalformedRequests(metrics.malformed_request)
    return Engine(broker, backend, metrics, tickets, admission, malformed)


def metrics_tls(config: Config) -> MetricsTls | None:
    """The metrics listener's TLS files (None: plain HTTP); StartupError if incomplete."""
    cert, key, ca = config.metrics_tls_cert, config.metrics_tls_key, config.metrics_tls_client_ca
    if not cert:
        if key or ca:
            raise StartupError(
                "--metrics-tls-key and --metrics-tls-client-ca need --metrics-tls-cert"
            )
        return None
    if not key:
        raise StartupError("--metrics-tls-cert needs --metrics-tls-key")
    return MetricsTls(cert, key, ca)


def serve_metrics(config: Config, engine: Engine) -> str | None:
    """Bound before gRPC so that a taken port refuses the start cleanly. The URL, or None."""
    engine.metrics.bind(engine.broker, asyncio.get_running_loop())
    tls = metrics_tls(config)
    try:
        return engine.metrics.serve(config.metrics_address, tls, config.metrics_tenant_series)
    except (OSError, ValueError, OverflowError) as exc:
        raise StartupError(
            f"cannot serve metrics on {config.metrics_address}: {exc}"
            " (choose another --metrics-address, or 'off')"
        ) from None


def build_peer_server(config: Config, engine: Engine) -> PeerServer:
    """The handshake's socket (not yet bound): bound under umask 077 and chmod-ed before
    listen(), so no connection arrives before its mode."""
    backend = engine.backend
    return PeerServer(
        config.peer_socket_path,
        engine.tickets,
        mode=config.socket_mode,
        fd_checks=iommufd_fd_checks(backend) if isinstance(backend, IommufdBackend) else None,
    )


def start_peer_server(config: Config, peer: PeerServer) -> None:
    peer_path = config.peer_socket_path
    try:
        peer.start()
    except OSError as exc:
        raise StartupError(f"cannot listen on peer socket {peer_path}: {exc}") from None
    if config.socket_group:
        set_mode_and_group(Path(peer_path), config.socket_mode, config.socket_group)


def stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def recover(engine: Engine) -> None:
    """The backend, allocator and sessions from the store; recovered sets count against
    their holders' limits."""
    await engine.broker.start()
    for sess in engine.broker.sessions():
        engine.admission.restore(sess.session_id, identity_of_holder(sess))


def announce(
    config: Config,
    engine: Engine,
    endpoints: Endpoints,
    notifier: Notifier,
    tls: TlsFiles | None,
    metrics_url: str | None,
    nofile: tuple[int, int],
) -> str:
    """The one "serving" log line, and READY to systemd; returns its STATUS text."""
    broker = engine.broker
    addresses = ",".join(endpoints.addresses)
    serving_backend = broker.caps.name if broker.caps else config.backend
    log.info(
        "serving",
        extra={
            "addresses": addresses,
            "admin": config.admin_socket_path or "off",
            "peer_socket": config.peer_socket_path,
            "anonymous": config.anonymous,
            "tcp": "off" if not config.listen else ("mutual TLS" if tls else "insecure"),
            # The backend actually serving: a --vfio-fallback may have replaced vfio.
            "backend": serving_backend,
            "db": config.db,
            "metrics_url": metrics_url or "off",
            "nofile": nofile[0],
            "health_address": endpoints.health_address,
        },
    )
    text = f"serving on {addresses} ({serving_backend} backend)"
    notifier.ready(text)
    return text


async def follow_commits(
    config: Config, engine: Engine, endpoints: Endpoints, notifier: Notifier, serving: str
) -> None:
    """Readiness follows the disk: NOT_SERVING while commits fail (from the first failed
    one until one lands: the broker can change nothing, so it must not be sent clients)
    and while a commit takes longer than --slow-commit-seconds; SERVING again once commits
    land and are quick. The event loop never waits on a commit (the journal's writer
    thread does), so health, GetInfo and releases keep answering meanwhile, and so does
    the 'liveness' service. pasid_broker_ready (set_ready) and systemd's STATUS say the
    same (`serving`: the text for when all is well)."""
    bound = config.slow_commit_seconds
    journal = engine.broker.journal
    slow = failing = False
    while True:
        await asyncio.sleep(min(bound / 4, 0.25) if bound > 0 else 0.25)
        if engine.broker.stopping:
            continue
        now_slow = bound > 0 and journal.commit_stalled(bound)
        now_failing = journal.failing_seconds() > 0
        if (now_slow, now_failing) == (slow, failing):
            continue
        error = journal.failing_error.message if journal.failing_error is not None else ""
        if now_failing and not failing:
            log.error(
                "commits are failing: health NOT_SERVING until one lands",
                extra={"error": error, "exit_after_seconds": config.store_error_exit_seconds},
            )
        elif failing and not now_failing:
            log.info("commits land again: health SERVING unless they are slow")
        if now_slow and not slow:
            log.warning(
                "commits are slow: health NOT_SERVING until they are quick again",
                extra={"bound_seconds": bound},
            )
        elif slow and not now_slow:
            log.info(
                "commits are quick again: health SERVING",
                extra={"last_commit_seconds": round(journal.last_commit_seconds, 6)},
            )
        slow, failing = now_slow, now_failing
        await set_ready(engine, endpoints, not (slow or failing))
        if failing:
            notifier.status(f"not ready: commits are failing ({error}); every change refused")
        elif slow:
            notifier.status(f"not ready: commits are slower than {bound:g} s")
        else:
            notifier.status(serving)


async def set_ready(engine: Engine, endpoints: Endpoints, ready: bool) -> None:
    """Readiness, decided by the start-up, follow_commits, the drain and a failed
    store, and said here only: recorded as Broker.serving, which the health service's
    readiness ("" and SERVICE_NAME) is set from and pasid_broker_ready reads, so that the
    probe and the gauge (its alert, PasidBrokerNotReady) never disagree."""
    engine.broker.serving = ready
    status = health_pb2.HealthCheckResponse
    await endpoints.set_health(status.SERVING if engine.broker.serving else status.NOT_SERVING)


def stop_on_store_failure(engine: Engine, stop: asyncio.Event) -> None:
    """The first StoreFailed (a failed fsync) stops the daemon, like a signal."""
    task = asyncio.ensure_future(engine.broker.failed.wait())
    task.add_done_callback(lambda _: stop.set())


async def store_failed(
    engine: Engine, endpoints: Endpoints, peer: PeerServer, notifier: Notifier
) -> int:
    """The store can no longer be trusted: every probe says NOT_SERVING, and the daemon
    exits EXIT_STORE_FAILED at once, without a drain (nothing in flight can be
    acknowledged any more) nor a checkpoint (Broker.stop)."""
    failure = engine.broker.failure
    assert failure is not None
    await set_ready(engine, endpoints, False)
    await endpoints.set_liveness(health_pb2.HealthCheckResponse.NOT_SERVING)
    notifier.status(f"store failed: {failure.message}; exiting for a restart")
    log.critical(
        "exiting: the store failed; a restart recovers from what is durable",
        extra={"error": failure.message, "exit_status": EXIT_STORE_FAILED},
    )
    engine.broker.stopping = True
    peer.refuse_all(PEER_SHUTTING_DOWN)
    engine.broker.end_watches()
    return EXIT_STORE_FAILED


# The peer socket's answer while the broker stops: as the gRPC socket's opens are told
# (broker/engine/broker.py), "retry after the restart", which the client library does.
PEER_SHUTTING_DOWN = "broker is shutting down; handshake again after the restart"


async def drain(
    config: Config, engine: Engine, endpoints: Endpoints, peer: PeerServer, notifier: Notifier
) -> None:
    """SIGTERM: refuse new work (opens, and handshakes whose tickets would die with this
    process), end Watches, let in-flight calls finish."""
    log.info("draining", extra={"seconds": config.drain_seconds})
    notifier.stopping(f"draining in-flight calls for up to {config.drain_seconds:g} s")
    engine.broker.stopping = True
    peer.refuse_all(PEER_SHUTTING_DOWN)
    engine.broker.end_watches()
    await set_ready(engine, endpoints, False)  # then every health service, by the drain
    await endpoints.drain(config.drain_seconds)


# -- adapters between the peer socket, the engine and the authorizer ------------------


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
