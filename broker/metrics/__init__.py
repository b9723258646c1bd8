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
Those two name tenants: they are served only with --metrics-tenants (by default, only to
scrapers with a client certificate of --metrics-tls-client-ca).

One job a module:
- registry.py   Metrics: the families, the engine observer's hooks, the servicer's
                stream-op timer, /metrics over HTTP
- labels.py     bounded label values and latency buckets; reclaim_reason, result_of
- state.py      the state gauges, from a snapshot taken on the event loop at scrape time
- backend.py    InstrumentedBackend: each backend call timed, each failure counted
- rpc_timer.py  RpcTimer: the server interceptor that times unary RPCs
(broker/loop_metrics.py: the lock-free counters and histograms of the request path.)
"""

from broker.metrics.labels import LATENCY_BUCKETS, RECLAIM_REASONS, TOP_CLIENTS, reclaim_reason
from broker.metrics.registry import DEFAULT_ADDRESS, Metrics, MetricsTls, parse_address

__all__ = [
    "DEFAULT_ADDRESS",
    "LATENCY_BUCKETS",
    "RECLAIM_REASONS",
    "TOP_CLIENTS",
    "Metrics",
    "MetricsTls",
    "parse_address",
    "reclaim_reason",
]
