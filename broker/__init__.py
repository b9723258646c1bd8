"""pasid-broker: a host's PASID namespace, arbitrated over gRPC.

Where things are:
- core/      the allocator: ioasid_sets, namespace, quotas, errors (no gRPC, no SQL)
- backends/  where requests go: simulator, vfio; `backends.create` picks one
- store/     SQLite through SQLAlchemy; the only SQL
- engine.py  allocator + backend + store; `Broker.end_session` frees a departed set
- service/   gRPC: servicer, status table (core error -> gRPC status), server; instance
             (one broker per host: locks, owned sockets, start-up checks)
- config.py  settings: flags, PASID_BROKER_* environment, TOML file (one declaration each)
- systemd.py sd_notify: READY, STATUS, WATCHDOG, STOPPING
- operate.py `pasid-broker backup | restore | health`
- metrics.py Prometheus metrics: names, hooks, scrape-time gauges, /metrics endpoint
"""

__version__ = "0.1.0"
