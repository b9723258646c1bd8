"""The state gauges, read when Prometheus scrapes: PASIDs in use, capacity, sessions,
sets by state and identity, quotas, the largest holders.

Taken in one snapshot on the broker's event loop thread (the HTTP server's thread hops
there), so the alloc path pays nothing for them and the figures agree with each other.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from broker import __version__
from broker.metrics.labels import OTHER, TOP_CLIENTS

if TYPE_CHECKING:
    from broker.engine import Broker

# How long a scrape waits for the event loop to take a snapshot.
SNAPSHOT_TIMEOUT = 2.0


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
    # Detached sets whose verified holder still runs (it is watched: an exit destroys
    # the set at once), and how long the oldest of them has been detached (0: none).
    detached_verified: int = 0
    oldest_detached_seconds: float = 0.0
    # How long commits have been failing, none landing since (0: they land).
    store_failing_seconds: float = 0.0


def take_state(broker: Broker, top: int = TOP_CLIENTS) -> State | None:
    """Read the broker's state; must run on its event loop thread. None before start."""
    if broker.caps is None:
        return None
    i = broker.info()
    per_client: dict[str, int] = {}
    detached = 0
    holders: list[tuple[int, str, int, int, int, int]] = []
    now = broker.clock()
    detached_verified = 0
    oldest = 0.0
    for s in broker.sessions():
        per_client[s.client] = per_client.get(s.client, 0) + len(s.set)
        detached += not s.attached
        h = s.holder
        if h is not None:
            holders.append((s.session_id, s.client, h.pid, h.uid, h.ns_pid, len(s.set)))
            if not s.attached:
                detached_verified += 1
                if s.detached_unix:
                    oldest = max(oldest, now - s.detached_unix)
    ranked = sorted(per_client.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ranked[:top]
    rest = sum(n for _, n in ranked[top:])
    q = i.quotas
    return State(
        ready=broker.serving,  # what the health service's readiness says
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
        detached_verified=detached_verified,
        oldest_detached_seconds=max(oldest, 0.0),
        store_failing_seconds=broker.store_failing_seconds(),
    )


class StateCollector(Collector):
    """Gauges computed at scrape time from a State snapshot of the broker bound to it."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Broker | None = None
        # The series that name tenants (client names, pids, uids): only where those who
        # scrape may read what the admin API shows (--metrics-tenants).
        self.tenants = False

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

    def collect(self) -> Iterable[Metric]:
        info = InfoMetricFamily(
            "pasid_broker_build", "Version of the running broker (value is always 1)."
        )
        info.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield info
        st = self._snapshot()
        ready = GaugeMetricFamily(
            "pasid_broker_ready",
            "1 while readiness (the health services '' and pasid.v1.PasidBroker) is SERVING;"
            " 0 while recovering, draining, or while commits fail or are slower than"
            " --slow-commit-seconds.",
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
            (
                "pasid_broker_detached_verified_sets",
                "Detached sets whose kernel-verified holder still runs (kept until it exits"
                " or re-attaches: a sidecar that has not come back, or a broker restart).",
                st.detached_verified,
            ),
            (
                "pasid_broker_detached_oldest_seconds",
                "How long the oldest detached set with a live verified holder has been"
                " detached; 0 when there is none.",
                st.oldest_detached_seconds,
            ),
            (
                "pasid_broker_store_failing_seconds",
                "How long commits have been failing with none landing since (the broker"
                " refuses every change and readiness is NOT_SERVING meanwhile); 0 while"
                " they land.",
                st.store_failing_seconds,
            ),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g
        yield _by_label(
            "pasid_broker_sets",
            "ioasid_sets by state: attached to a session's stream, or detached (no stream:"
            " until its verified holder exits or re-attaches, or its grace ends).",
            "state",
            (("attached", st.sets_attached), ("detached", st.sets_detached)),
        )
        yield _by_label(
            "pasid_broker_quota_limit_pasids",
            "Configured quota per kind; 0 means no limit.",
            "quota",
            st.quotas,
        )
        yield _by_label(
            "pasid_broker_sets_by_identity",
            "ioasid_sets by holder: 'verified' (the kernel named the process in the peer"
            " handshake) or 'anonymous' (bound to stream and grace only).",
            "identity",
            (("verified", st.sets_verified), ("anonymous", st.sets_anonymous)),
        )
        if not self.tenants:
            return
        yield _by_label(
            "pasid_broker_top_client_pasids",
            f"PASIDs held by the {TOP_CLIENTS} largest declared clients (all their sets);"
            f' client="{OTHER}" sums the rest.',
            "client",
            st.top_clients,
        )
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


def _by_label(
    name: str, documentation: str, label: str, values: Iterable[tuple[str, int]]
) -> GaugeMetricFamily:
    """A gauge with one label: a sample per (label value, number), in that order."""
    g = GaugeMetricFamily(name, documentation, labels=[label])
    for value, n in values:
        g.add_metric([value], float(n))
    return g
