"""`pasid-broker`: the daemon's entry point. Exit 0 after a clean stop, 2 if it cannot start."""

from __future__ import annotations

import logging
import sys

import uvloop

from broker import config, logs
from broker.core import PasidError
from broker.engine import RecoveryError
from broker.service.server import StartupError, serve


def main(argv: list[str] | None = None) -> int:
    cfg = config.load(argv)
    logs.setup(cfg.log_format, cfg.log_level)
    try:
        # uvloop: 10 % less CPU per session-stream request than asyncio's own loop under
        # 16 streams, same run (docs/performance.md); grpc.aio runs on any asyncio loop.
        return uvloop.run(serve(cfg))
    except (StartupError, RecoveryError, PasidError) as exc:
        logging.getLogger("pasid_broker").error("cannot start: %s", exc)
        if cfg.log_format != "json":  # in JSON mode the log line above is the only one
            print(f"pasid-broker: cannot start: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
