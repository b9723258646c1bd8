"""Prometheus metrics: what a dashboard needs, in Prometheus conventions.

The one place that knows metric names (docs/observability.md lists them). The engine and
servicer call a few cheap hooks; everything else is read at scrape time:

- Counters and histograms are updated where things happen, through label children
  created once (a `.labels()` lookup costs about 3x the increment it guards).
- Gauges of state (PASIDs in use, capacity, sessions, top holders) are computed when
  Prometheus scrapes, from a snapshot taken on the broker's event loop thread, so the
  alloc path pays nothing for them and the figures are mutually consistent.

Cardinality: no label takes a per-client or per-session value except
`pasid_broker_top_client_pasids{client}`, which exposes at most TOP_CLIENTS clients (the
largest holders) plus one `client="(other)"` series for the rest, and
`pasid_broker_top_holder_pasids{set_id,client,pid,uid,ns_pid}`, at most TOP_CLIENTS sets.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from broker import __version__
from broker.backends.base import Backend, Capabilities, alloc_each
from broker.backends.base import replay as generic_replay
from broker.core import PasidError, QuotaExceeded
from broker.engine.observers import Observer
from broker.loop_metrics import LoopHistogram, LoopMetrics
from broker.service.interceptors import PerMethodWrapper, rebuild
from broker.store.records import AddPasids, Event, Record, RemovePasids

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from broker.engine import Broker

DEFAULT_ADDRESS = "127.0.0.1:9464"

# 50 µs .. 1 s: a session-stream alloc takes ~0.2 ms, a group commit ~0.1-1 ms; the
# client library's default buckets start at 5 ms and would put everything in the first.
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)

# How many clients `pasid_broker_top_client_pasids` names; the rest are summed as OTHER.
TOP_CLIENTS = 10
OTHER = "(other)"

# Bounded label values. Results are the core errors' reasons, lower-cased.
RESULTS = (
    "ok",
    "invalid_range",
    "invalid_argument",
    "exhausted",
    "quota_exceeded",
    "not_found",
    "conflict",
    "unsupported",
    "backend",
    "store",
    "error",
)
QUOTA_KINDS = ("set", "client", "global", "kernel")
RECLAIM_REASONS = ("client_exit", "grace_expired", "restart", "revoke", "other")
BACKEND_OPS = ("alloc", "free", "replay")
SESSION_OPS = ("open", "alloc", "free", "list", "request")
UNARY_RPCS = (
    "Alloc",
    "Free",
    "List",
    "GetInfo",
    "PasidRequest",
    "ListSets",
    "RevokeSet",
    "SetQuotas",
)

# How long a scrape waits for the event loop to take a snapshot.
SNAPSHOT_TIMEOUT = 2.0


def result_of(exc: BaseException | None) -> str:
    """The `result` label for an outcome: "ok", or the error's reason (bounded)."""
    if exc is None:
        return "ok"
    if isinstance(exc, PasidError):
        r = exc.reason.lower()
        return r if r in RESULTS else "error"
    return "error"


def reclaim_reason(reason: str) -> str:
    """Normalise the engine's free-text reasons for destroying a set into RECLAIM_REASONS."""
    r = reason.lower()
    if "revoke" in r:
        return "revoke"
    if "restart" in r:
        # A set nobody resumed after a broker restart; a client seen dead at restart
        # exited, which is its own reason.
        return "client_exit" if "exited" in r else "restart"
    if "grace" in r:
        return "grace_expired"
    if "disconnect" in r or "exit" in r:
        return "client_exit"
    return "other"


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


@dataclass(frozen=True)
class State:
    """The gauges' values, taken in one go on the event loop thread."""

    ready: bool
    backend: str
    pasid_bits: int
    capacity: int
    in_use: int
    reserved: int
    sessions: int
    sets_attached: int
    sets_detached: int
    quotas: tuple[tuple[str, int], ...]
    top_clients: tuple[tuple[str, int], ...]
    # Sets by holder identity: kernel-verified (peer handshake) or anonymous.
    sets_verified: int = 0
    sets_anonymous: int = 0
    # The largest verified sets: (set_id, client, pid, uid, ns_pid, PASIDs held).
    top_holders: tuple[tuple[int, str, int, int, int, int], ...] = ()
    widths: tuple[tuple[str, str, int, int], ...] = ()


def take_state(broker: Broker, top: int = TOP_CLIENTS) -> State | None:
    """Read the broker's state; must run on its event loop thread. None before start."""
    if broker.caps is None:
        return None
    i = broker.info()
    per_client: dict[str, int] = {}
    detached = 0
    holders: list[tuple[int, str, int, int, int, int]] = []
    for s in broker.sessions():
        per_client[s.client] = per_client.get(s.client, 0) + len(s.set)
        detached += not s.attached
        h = s.holder
        if h is not None:
            holders.append((s.session_id, s.client, h.pid, h.uid, h.ns_pid, len(s.set)))
    ranked = sorted(per_client.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ranked[:top]
    rest = sum(n for _, n in ranked[top:])
    q = i.quotas
    return State(
        ready=broker.ready and not broker.stopping,  # draining is not serving
        backend=i.backend,
        pasid_bits=i.pasid_bits,
        capacity=i.capacity,
        in_use=i.in_use,
        reserved=i.reserved,
        sessions=i.sessions,
        sets_attached=i.sets - detached,
        sets_detached=detached,
        quotas=(("set", q.per_set), ("client", q.per_client), ("global", q.global_)),
        top_clients=(*shown, (OTHER, rest)),
        sets_verified=len(holders),
        sets_anonymous=i.sets - len(holders),
        top_holders=tuple(sorted(holders, key=lambda h: (-h[5], h[0]))[:top]),
        widths=i.widths,
    )


class _StateCollector(Collector):
    """Gauges computed at scrape time from a State snapshot."""

    def __init__(self, source: Callable[[], State | None]) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        info = InfoMetricFamily(
            "pasid_broker_build", "Version of the running broker (value is always 1)."
        )
        info.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield info
        st = self._source()
        ready = GaugeMetricFamily(
            "pasid_broker_ready", "1 once recovery is done and requests are served, else 0."
        )
        ready.add_metric([], 1.0 if st is not None and st.ready else 0.0)
        yield ready
        if st is None:
            return
        backend = InfoMetricFamily("pasid_broker_backend", "The backend and its PASID width.")
        backend.add_metric([], {"backend": st.backend, "pasid_bits": str(st.pasid_bits)})
        yield backend
        if st.widths:
            widths = GaugeMetricFamily(
                "pasid_broker_pasid_width_bits",
                "PASID width the kernel reports: per IOMMU (VT-d ECAP.PSS) and per delegated"
                " device (IOMMU_GET_HW_INFO).",
                labels=["kind", "name", "set"],
            )
            for kind, name, bits, set_id in st.widths:
                widths.add_metric([kind, name, str(set_id) if kind == "device" else ""], bits)
            yield widths
        for name, doc, value in (
            (
                "pasid_broker_pasids_capacity",
                "PASIDs the broker can hand out: 2^pasid_bits minus PASID 0 and reserved.",
                st.capacity,
            ),
            ("pasid_broker_pasids_in_use", "PASIDs held by sets now.", st.in_use),
            ("pasid_broker_pasids_reserved", "PASIDs never handed out.", st.reserved),
            ("pasid_broker_sessions", "Sessions attached to a stream now.", st.sessions),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g
        sets = GaugeMetricFamily(
            "pasid_broker_sets",
            "ioasid_sets by state: attached to a session, or detached awaiting resume.",
            labels=["state"],
        )
        sets.add_metric(["attached"], float(st.sets_attached))
        sets.add_metric(["detached"], float(st.sets_detached))
        yield sets
        quota = GaugeMetricFamily(
            "pasid_broker_quota_limit_pasids",
            "Configured quota per kind; 0 means no limit.",
            labels=["quota"],
        )
        for kind, limit in st.quotas:
            quota.add_metric([kind], float(limit))
        yield quota
        top = GaugeMetricFamily(
            "pasid_broker_top_client_pasids",
            f"PASIDs held by the {TOP_CLIENTS} largest declared clients (all their sets);"
            f' client="{OTHER}" sums the rest.',
            labels=["client"],
        )
        for client, n in st.top_clients:
            top.add_metric([client], float(n))
        yield top
        ident = GaugeMetricFamily(
            "pasid_broker_sets_by_identity",
            "ioasid_sets by holder: 'verified' (the kernel named the process in the peer"
            " handshake) or 'anonymous' (bound to stream and grace only).",
            labels=["identity"],
        )
        ident.add_metric(["verified"], float(st.sets_verified))
        ident.add_metric(["anonymous"], float(st.sets_anonymous))
        yield ident
        holders = GaugeMetricFamily(
            "pasid_broker_top_holder_pasids",
            f"PASIDs held by the {TOP_CLIENTS} largest sets with a kernel-verified holder:"
            " its pid (broker's pid namespace), uid, and ns_pid (its pid in its own"
            " namespace).",
            labels=["set_id", "client", "pid", "uid", "ns_pid"],
        )
        for set_id, client, pid, uid, ns_pid, n in st.top_holders:
            holders.add_metric([str(set_id), client, str(pid), str(uid), str(ns_pid)], float(n))
        yield holders


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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Broker | None = None
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
        r.register(_StateCollector(self._snapshot))

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
        self._broker = broker
        self._loop = loop

    def _snapshot(self) -> State | None:
        broker, loop = self._broker, self._loop
        if broker is None or loop is None or loop.is_closed():
            return None
        try:
            if asyncio.get_running_loop() is loop:
                return take_state(broker)
        except RuntimeError:
            pass  # not on a loop: the HTTP server's thread, the usual case
        cf: concurrent.futures.Future[State | None] = concurrent.futures.Future()

        def take() -> None:
            try:
                cf.set_result(take_state(broker))
            except BaseException as exc:  # report to the scrape, never kill the loop
                cf.set_exception(exc)

        try:
            loop.call_soon_threadsafe(take)
            return cf.result(timeout=SNAPSHOT_TIMEOUT)
        except (RuntimeError, concurrent.futures.TimeoutError):
            return None  # loop closed or busy (recovery): state gauges are left out

    def serve(self, address: str) -> str | None:
        """Serve /metrics at HOST:PORT in a daemon thread; its URL, or None when 'off'.

        Raises OSError if the address cannot be bound."""
        hp = parse_address(address)
        if hp is None:
            return None
        host, port = hp
        self._http, _ = start_http_server(port, host, registry=self.registry)
        bound = self._http.server_port
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{bound}/metrics"

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class InstrumentedBackend:
    """A Backend that times every call and counts failures (op: alloc, free, replay)."""

    def __init__(self, inner: Backend, metrics: Metrics) -> None:
        self.inner = inner
        self.name = inner.name
        self._m = metrics
        self._alloc = metrics._backend_calls["alloc"].observe
        self._free = metrics._backend_calls["free"].observe
        self._replay = metrics._backend_calls["replay"].observe
        self._own_alloc_many = getattr(inner, "alloc_many", None)
        self._own_free_many = getattr(inner, "free_many", None)

    def open(self) -> Capabilities:
        return self.inner.open()

    def alloc(self, lo: int, hi: int) -> int:
        t0 = time.perf_counter()
        try:
            return self.inner.alloc(lo, hi)
        except BaseException as exc:
            self._m.backend_error("alloc", exc)
            raise
        finally:
            self._alloc(time.perf_counter() - t0)

    def alloc_many(self, lo: int, hi: int, count: int) -> list[int]:
        # A backend's own alloc_many is one call, timed once (the simulator's); without
        # one, the loop goes through self.alloc, so each ioctl is timed as before.
        own = self._own_alloc_many
        if own is None:
            return alloc_each(self, lo, hi, count)
        t0 = time.perf_counter()
        try:
            return list(own(lo, hi, count))
        except BaseException as exc:
            self._m.backend_error("alloc", exc)
            raise
        finally:
            self._alloc(time.perf_counter() - t0)

    def free(self, lo: int, hi: int) -> None:
        t0 = time.perf_counter()
        try:
            self.inner.free(lo, hi)
        except BaseException as exc:
            self._m.backend_error("free", exc)
            raise
        finally:
            self._free(time.perf_counter() - t0)

    def free_many(self, pasids: Sequence[int]) -> bool:
        own = self._own_free_many
        if own is None:
            return False
        t0 = time.perf_counter()
        try:
            return bool(own(pasids))
        except BaseException as exc:
            self._m.backend_error("free", exc)
            raise
        finally:
            self._free(time.perf_counter() - t0)

    def replay(self, pasids: Iterable[int]) -> int:
        t0 = time.perf_counter()
        try:
            return generic_replay(self.inner, pasids)
        except BaseException as exc:
            self._m.backend_error("replay", exc)
            raise
        finally:
            self._replay(time.perf_counter() - t0)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # Anything else a backend offers (capabilities, test hooks) is the inner one's.
        return getattr(self.inner, name)


class RpcTimer(PerMethodWrapper):
    """Times each unary pasid.v1 RPC named in UNARY_RPCS, from the handler's start to its
    reply being ready (aborted calls too). Streams are not timed here: the Session
    stream's operations are timed one by one (Metrics.session_op_done).

    Wrapped handlers are built once per method and reused: no per-call `.labels()` or
    handler construction on the hot path.
    """

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        service, _, rpc = method.lstrip("/").rpartition("/")
        if (
            handler is None
            or not service.startswith("pasid.v1.")
            or rpc not in UNARY_RPCS
            or handler.unary_unary is None
        ):
            return handler
        inner = handler.unary_unary
        observe = self._metrics.unary(rpc).observe

        async def timed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            t0 = time.perf_counter()
            try:
                return await inner(request, context)
            finally:
                observe(time.perf_counter() - t0)

        return rebuild(handler, timed)
