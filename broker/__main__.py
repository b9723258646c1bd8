"""`pasid-broker`: the daemon's entry point, and its two operator subcommands.

Exit 0 after a clean stop; 2 if it cannot start, with ONE line on stderr saying why (in
--log-format json, one JSON line), never a traceback; 3 (EXIT_STORE_FAILED) when the
store failed while serving (a failed fsync): restart it, it recovers from what is durable.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import uvloop

from broker import config, logs
from broker.core import PasidError
from broker.engine import RecoveryError
from broker.service.server import EXIT_STORE_FAILED, StartupError, serve

SUBCOMMANDS = ("backup", "restore", "withheld", "health")


def refuse(message: str, log_format: str = "text") -> int:
    """Print the one line of a refusal to start; the caller exits 2."""
    if log_format == "json":
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        line = {"ts": ts, "level": "error", "logger": "pasid_broker"}
        print(json.dumps({**line, "msg": f"cannot start: {message}"}), file=sys.stderr)
    else:
        print(f"pasid-broker: cannot start: {message}", file=sys.stderr)
    return 2


def _wants_json(args: list[str]) -> bool:
    """Whether a refusal found while reading the settings should be a JSON line too."""
    for i, a in enumerate(args):
        if a == "--log-format=json" or (a == "--log-format" and args[i + 1 : i + 2] == ["json"]):
            return True
    return os.environ.get(config.ENV_PREFIX + "LOG_FORMAT") == "json"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in SUBCOMMANDS:
        from broker import operate

        return operate.main(args)
    try:
        loaded = config.load_full(args)
    except config.ConfigError as exc:
        return refuse(str(exc), "json" if _wants_json(args) else "text")
    cfg = loaded.config
    if loaded.print_config:
        print(loaded.render(loaded.print_config))
        return 0
    logs.setup(cfg.log_format, cfg.log_level)
    try:
        # uvloop: 10 % less CPU per session-stream request than asyncio's own loop under
        # 16 streams, same run (docs/performance.md); grpc.aio runs on any asyncio loop.
        code = int(uvloop.run(serve(cfg)))
    except (StartupError, RecoveryError, PasidError) as exc:
        return refuse(str(exc), cfg.log_format)
    if code == EXIT_STORE_FAILED:
        # Out now, as after a kill -9: no finalizer may close (and so checkpoint) the
        # store's connection over a page cache that can no longer be trusted.
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
