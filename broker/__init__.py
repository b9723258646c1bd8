"""pasid-broker: a host's PASID namespace, arbitrated over gRPC.

Where things are (README.md's Architecture section has the module map):
- core/      the allocator: ioasid_sets, namespace, quotas, errors (no gRPC, no SQL)
- backends/  where requests go: simulator, iommufd, vfio; `backends.create` picks one
- store/     SQLite: the only SQL (plain sqlite3 on the hot path; Alembic migrations)
- engine/    the rules, one job a module; `Sessions.destroy_set` is where a set is freed
- peer/      who the client is, from the kernel (SO_PEERCRED, pidfds, tickets)
- service/   gRPC: the error boundary, the Session stream, the unary and admin calls,
             status table, server start-up; instance (one broker per host)
- config/    settings: flags, PASID_BROKER_* environment, TOML file (one declaration each)
- systemd.py sd_notify: READY, STATUS, WATCHDOG, STOPPING
- operate.py `pasid-broker backup | restore | health`
- metrics/   Prometheus metrics: names, observer hooks, scrape-time gauges, /metrics
"""

__version__ = "0.1.0"
