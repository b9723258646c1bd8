"""Metrics: every metric family defined once, the hooks that update them, /metrics served.

Counters and histograms are updated where things happen, through label children created
once (a `.labels()` lookup costs about 3x the increment it guards); the request path's
are loop_metrics' lock-free ones. State gauges are state.py's, read at scrape time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from broker.backends.base import Backend
from broker.core import QuotaExceeded
from broker.engine.observers import Observer
from broker.loop_metrics import LoopHistogram, LoopMetrics
from broker.metrics.backend import InstrumentedBackend
from broker.metrics.labels import (
    BACKEND_OPS,
    LATENCY_BUCKETS,
    QUOTA_KINDS,
    RECLAIM_REASONS,
    RESULTS,
    SESSION_OPS,
    UNARY_RPCS,
    reclaim_reason,
    result_of,
)
from broker.metrics.rpc_timer import RpcTimer
from broker.metrics.state import StateCollector
from broker.store.records import AddPasids, Event, Record, RemovePasids

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from broker.engine import Broker

DEFAULT_ADDRESS = "127.0.0.1:9464"


@dataclass(frozen=True)
class MetricsTls:
    """PEM files of the metrics listener: its certificate and key, and the CA its
    scrapers' client certificates must chain to ('' = any client may scrape)."""

    cert: str
    key: str
    client_ca: str = ""


def parse_address(text: str) -> tuple[str, int] | None:
    """'HOST:PORT' (IPv6 as '[::1]:PORT'), or None for 'off' / ''."""
    t = text.strip()
    if t.lower() in ("", "off", "none", "0"):
        return None
    host, sep, port = t.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address {text!r}: expected HOST:PORT or 'off'")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class Metrics(Observer):
    """The broker's metrics on a registry of its own (no process-global state).

    It observes the engine (subscribe it to Broker.observers), times RPCs as a server
    interceptor (rpc_timer()), and times session-stream operations (session_op_done)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # `_created` series double the exposition and no dashboard here reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # process_* (RSS, CPU, fds, start time: memory target and restarts) and python_info,
        # read from /proc at scrape time, on this registry rather than the global one.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self._state = StateCollector()
        self._http: WSGIServer | None = None

        # The request path's counters and histograms are loop_metrics' lock-free ones;
        # the rest (rare events, gauges) are prometheus_client's own.
        hot = self._hot = LoopMetrics()
        allocations = hot.counter(
            "pasid_broker_allocations",
            "Alloc requests by result (ok, or the error's reason).",
            ["result"],
        )
        frees = hot.counter("pasid_broker_frees", "Free requests by result.", ["result"])
        self._alloc_result = {k: allocations.labels(k) for k in RESULTS}
        self._free_result = {k: frees.labels(k) for k in RESULTS}
        self._alloc_ok = self._alloc_result["ok"]
        self._free_ok = self._free_result["ok"]
        self._pasids_allocated = hot.counter(
            "pasid_broker_pasids_allocated", "PASIDs handed out (durably)."
        )
        self._pasids_freed = hot.counter(
            "pasid_broker_pasids_freed", "PASIDs freed by their session's Free."
        )
        reclaimed_sets = Counter(
            "pasid_broker_sets_reclaimed",
            "Sets destroyed by the broker, by reason (client_exit, grace_expired, restart,"
            " revoke, other).",
            ["reason"],
            registry=r,
        )
        reclaimed_pasids = Counter(
            "pasid_broker_pasids_reclaimed",
            "PASIDs freed by destroying their set, by reason.",
            ["reason"],
            registry=r,
        )
        self._reclaimed_sets = {k: reclaimed_sets.labels(k) for k in RECLAIM_REASONS}
        self._reclaimed_pasids = {k: reclaimed_pasids.labels(k) for k in RECLAIM_REASONS}
        quota = Counter(
            "pasid_broker_quota_rejections",
            "Alloc requests refused because a quota would be crossed, by quota.",
            ["quota"],
            registry=r,
        )
        self._quota = {k: quota.labels(k) for k in QUOTA_KINDS}
        self._quota_family = quota
        opened = Counter(
            "pasid_broker_sessions_opened",
            "Sessions opened, new or resumed.",
            ["kind"],
            registry=r,
        )
        self._opened_new = opened.labels("new")
        self._opened_resumed = opened.labels("resumed")
        # A witness's claim the store gives elsewhere (issue 22): an alert fires on any.
        self._conflicts = Counter(
            "pasid_broker_pasid_conflicts",
            "PASIDs a resuming client holds that the store gives to another set (or holds"
            " back): two holders for one PASID, contested, never reissued silently.",
            registry=r,
        )
        # A conflict's end: the contested PASIDs went to the witness's set that claimed
        # them, once the other set's client had let go of them (its complete witness).
        self._conflicts_resolved = Counter(
            "pasid_broker_pasid_conflicts_resolved",
            "Contested PASIDs handed to the set whose resuming client claimed them, once the"
            " set the store gave them to had its client's complete witness without them.",
            registry=r,
        )
        # A complete witness's frees (issue 22): acknowledged frees the store had lost.
        self._refreed = Counter(
            "pasid_broker_pasids_refreed",
            "PASIDs a resuming client's complete witness no longer holds while the store"
            " still gave them to its set (an acknowledged free the store lost): freed again.",
            registry=r,
        )
        self._malformed = Counter(
            "pasid_broker_malformed_requests",
            "Requests refused as INVALID_ARGUMENT (undecodable, or a field out of range),"
            " by method (session-stream operations as Session/<op>).",
            ["method"],
            registry=r,
        )
        self._watchers = Gauge(
            "pasid_broker_watchers",
            "Watch streams open now (both sockets); limited by --max-watchers.",
            registry=r,
        )
        self._limit_refusals = Counter(
            "pasid_broker_limit_refusals",
            "Requests refused RESOURCE_EXHAUSTED by one of the broker's limits"
            " (docs/limits.md), by limit.",
            ["limit"],
            registry=r,
        )

        self._rpc = hot.histogram(
            "pasid_broker_request_duration_seconds",
            "Time from a request's arrival to its reply being ready, by RPC (session-stream"
            " operations as Session/<op>).",
            LATENCY_BUCKETS,
            ["rpc"],
        )
        self._session_op = {op: self._rpc.labels(f"Session/{op}") for op in SESSION_OPS}
        self._session_bad = self._rpc.labels("Session/invalid")
        self._unary = {name: self._rpc.labels(name) for name in UNARY_RPCS}

        self._commit = hot.histogram(
            "pasid_broker_store_commit_duration_seconds",
            "Duration of one group commit to SQLite.",
            LATENCY_BUCKETS,
        )
        self._commit_errors = Counter(
            "pasid_broker_store_commit_errors", "Group commits that failed.", registry=r
        )
        backend_calls = hot.histogram(
            "pasid_broker_backend_call_duration_seconds",
            "Duration of one backend call, by operation.",
            LATENCY_BUCKETS,
            ["op"],
        )
        backend_errors = Counter(
            "pasid_broker_backend_errors",
            "Backend calls that failed, by operation and error reason.",
            ["op", "error"],
            registry=r,
        )
        self._backend_calls = {op: backend_calls.labels(op) for op in BACKEND_OPS}
        self._backend_errors = backend_errors
        for op in BACKEND_OPS:
            backend_errors.labels(op, "backend")  # the one that pages: present from the start

        self._recovery_seconds = Gauge(
            "pasid_broker_recovery_duration_seconds",
            "How long the last start-up recovery took (load, check, replay, reclaim).",
            registry=r,
        )
        self._recovery_replayed = Gauge(
            "pasid_broker_recovery_replayed_pasids",
            "PASIDs replayed into the backend at the last start.",
            registry=r,
        )
        self._recovery_sets = Gauge(
            "pasid_broker_recovery_sets",
            "Sets restored from the store at the last start.",
            registry=r,
        )
        r.register(hot)
        r.register(self._state)

    # -- engine observer hooks (broker/engine/observers.py; event loop thread) --------

    def commit_done(
        self, records: Sequence[Record], events: Sequence[Event], seconds: float
    ) -> None:
        """A group commit landed: its duration, and what became durable."""
        self._commit.observe(seconds)
        allocs = frees = allocated = freed = 0
        for rec in records:
            if type(rec) is AddPasids:
                allocs += 1
                allocated += len(rec.pasids)
            elif type(rec) is RemovePasids:
                frees += 1
                freed += len(rec.pasids)
        if allocs:
            self._alloc_ok.inc(allocs)
            self._pasids_allocated.inc(allocated)
        if frees:
            self._free_ok.inc(frees)
            self._pasids_freed.inc(freed)

    def commit_failed(self, records: Sequence[Record], seconds: float) -> None:
        """A group commit failed: its allocs and frees were refused with STORE."""
        self._commit.observe(seconds)
        self._commit_errors.inc()
        for rec in records:
            if type(rec) is AddPasids:
                self._alloc_result["store"].inc()
            elif type(rec) is RemovePasids:
                self._free_result["store"].inc()

    def alloc_refused(self, exc: BaseException) -> None:
        self._alloc_result[result_of(exc)].inc()
        if isinstance(exc, QuotaExceeded):
            child = self._quota.get(exc.kind)
            (child or self._quota_family.labels("other")).inc()

    def free_refused(self, exc: BaseException) -> None:
        self._free_result[result_of(exc)].inc()

    def free_nothing(self) -> None:
        """A Free that found nothing of the caller's in its range (no commit needed)."""
        self._free_result["ok"].inc()

    def set_destroyed(self, set_id: int, reason: str, kind: str, pasids: int) -> None:
        r = reclaim_reason(reason)
        self._reclaimed_sets[r].inc()
        self._reclaimed_pasids[r].inc(pasids)

    def session_opened(self, set_id: int, resumed: bool) -> None:
        (self._opened_resumed if resumed else self._opened_new).inc()

    def pasid_conflict(self, set_id: int, pasids: int) -> None:
        self._conflicts.inc(pasids)

    def pasid_conflict_resolved(self, set_id: int, pasids: int) -> None:
        self._conflicts_resolved.inc(pasids)

    def pasids_refreed(self, set_id: int, pasids: int) -> None:
        self._refreed.inc(pasids)

    def recovered(self, seconds: float, replayed: int, sets: int) -> None:
        self._recovery_seconds.set(seconds)
        self._recovery_replayed.set(replayed)
        self._recovery_sets.set(sets)

    # -- request latency: the servicer's stream ops, and the RPC interceptor -----------

    def malformed_request(self, method: str) -> None:
        """A request refused as malformed (broker/service/wire.py)."""
        self._malformed.labels(method).inc()

    def watchers_open(self, n: int) -> None:
        """The number of open Watch streams changed."""
        self._watchers.set(n)

    def limit_refused(self, limit: str) -> None:
        """A request refused by a limit (broker/service/limits.py)."""
        self._limit_refusals.labels(limit).inc()

    def session_op_done(self, op: str | None, t0: float) -> None:
        """A session-stream request's reply is ready; `t0` is perf_counter() at arrival."""
        self._session_op.get(op or "", self._session_bad).observe(time.perf_counter() - t0)

    def unary(self, rpc: str) -> LoopHistogram:
        """The latency histogram child of a unary RPC (created once per name)."""
        child = self._unary.get(rpc)
        if child is None:
            child = self._unary[rpc] = self._rpc.labels(rpc)
        return child

    def rpc_timer(self) -> RpcTimer:
        """A grpc.aio server interceptor that times the unary RPCs of UNARY_RPCS."""
        return RpcTimer(self)

    # -- the backend ------------------------------------------------------------------

    def instrument(self, backend: Backend) -> Backend:
        """The backend, with each call timed and each failure counted."""
        return InstrumentedBackend(backend, self)

    def backend_error(self, op: str, exc: BaseException) -> None:
        self._backend_errors.labels(op, result_of(exc)).inc()

    # -- scrape-time state and the HTTP endpoint --------------------------------------

    def bind(self, broker: Broker, loop: asyncio.AbstractEventLoop) -> None:
        """Let scrapes read `broker`'s state, on `loop` (the thread that owns it)."""
        self._state.bind(broker, loop)

    def serve(
        self, address: str, tls: MetricsTls | None = None, tenants: bool = False
    ) -> str | None:
        """Serve /metrics at HOST:PORT in a daemon thread, over HTTPS with `tls` (and then
        only to client certificates of its CA, if it has one); its URL, or None when 'off'.
        `tenants`: also the series that name tenants (top clients and holders).

        Raises OSError if the address cannot be bound, ssl.SSLError (an OSError) if the
        TLS files cannot be used."""
        self._state.tenants = tenants
        hp = parse_address(address)
        if hp is None:
            return None
        host, port = hp
        if tls is None:
            self._http, _ = start_http_server(port, host, registry=self.registry)
        else:
            self._http, _ = start_http_server(
                port,
                host,
                registry=self.registry,
                certfile=tls.cert,
                keyfile=tls.key,
                client_cafile=tls.client_ca or None,
                client_auth_required=bool(tls.client_ca),
            )
        bound = self._http.server_port
        shown = f"[{host}]" if ":" in host else host
        scheme = "http" if tls is None else "https"
        return f"{scheme}://{shown}:{bound}/metrics"

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
