"""Structured logs: text for people, one JSON object per line for machines.

Context travels in `extra={...}` (session, client, reason, ...). Resume tokens are never
passed to a logger; only their hashes exist in the broker.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import types

_STD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extra = _fields(record)
        if extra:
            base += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return base


def setup(fmt: str = "text", level: str = "INFO") -> None:
    """One handler on stderr for everything Python writes there: the broker's loggers,
    libraries' (alembic, asyncio, grpc's Python layer), warnings (logger py.warnings) and
    uncaught exceptions in any thread, so that in JSON mode every line is one object.
    grpc's C core writes to fd 2 itself (GRPC_VERBOSITY, default ERROR) and is not
    rewritten here."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(t: type[BaseException], e: BaseException, tb: types.TracebackType | None) -> None:
    if issubclass(t, KeyboardInterrupt):
        sys.__excepthook__(t, e, tb)
        return
    logging.getLogger("pasid_broker").critical("uncaught exception", exc_info=(t, e, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None:
        return
    logging.getLogger("pasid_broker").critical(
        "uncaught exception in thread %s",
        args.thread.name if args.thread else "?",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )
