"""Structured logs: text for people, one JSON object per line for machines.

Context travels in `extra={...}` (session, client, reason, ...). Resume tokens are never
passed to a logger; only their hashes exist in the broker.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import TextIO

from broker.core.rate import TokenBucket

_STD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

# Clients choose device names, client names, reasons, and the text of refusals that quote
# them: a log line holds at most this much of any one field, and of its message, so that a
# 65,000-byte name costs the log a few hundred bytes (issue 20, point 5). Tracebacks are
# the broker's own and kept whole.
MAX_FIELD_CHARS = 256
MAX_MESSAGE_CHARS = 1024


def clip(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    """`text` cut to `limit` characters, saying how many were cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more chars]"


def _clipped(value: object) -> object:
    if value is None or isinstance(value, bool | int | float):
        return value
    return clip(value if isinstance(value, str) else str(value))


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: _clipped(v) for k, v in vars(record).items() if k not in _STD}


class LogThrottle:
    """Which lines of one kind may be written: per key (a peer) a token bucket of `burst`
    lines refilled over `interval` seconds, and all keys together at most `total` times
    that, so that neither one client nor many can make the log grow faster than a fixed
    rate. `allow` says how many lines of the key were held back since its last one (None:
    hold this one back too)."""

    _MAX_KEYS = 4096

    def __init__(
        self,
        burst: int,
        interval: float,
        total: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._burst = float(max(burst, 1))
        self._rate = self._burst / interval
        self._clock = clock
        self._all = TokenBucket(self._rate * max(total, 1), self._burst * max(total, 1), clock())
        self._keys: dict[str, TokenBucket] = {}
        self._held: dict[str, int] = {}  # lines held back per key since its last one

    def allow(self, key: str) -> int | None:
        now = self._clock()
        bucket = self._keys.get(key)
        if bucket is None:
            if len(self._keys) >= self._MAX_KEYS:
                self._keys = {
                    k: b for k, b in self._keys.items() if k in self._held or not b.full(now)
                }
            bucket = self._keys[key] = TokenBucket(self._rate, self._burst, now)
        if not (bucket.take(now) and self._all.take(now)):
            self._held[key] = self._held.get(key, 0) + 1
            return None
        return self._held.pop(key, 0)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": clip(record.getMessage(), MAX_MESSAGE_CHARS),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


# Control characters in a message become visible escapes (\n, \x1b): a client's text
# (a client name, a reason) cannot start a line of its own or drive the terminal.
_CONTROLS = {c: repr(chr(c))[1:-1] for c in (*range(0x20), 0x7F, 0x85, 0x2028, 0x2029)}


def escape_field(value: object) -> str:
    """A field's value as one token: bare when plain, else a JSON string (quoted, with
    control characters, spaces, quotes and '=' escaped), so a value cannot forge another
    field or line."""
    text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' "=\\'):
        return text
    return json.dumps(text)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = clip(record.message, MAX_MESSAGE_CHARS).translate(_CONTROLS)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extra = _fields(record)
        if extra:
            base += " " + " ".join(f"{k}={escape_field(v)}" for k, v in extra.items())
        return base


# The relay behind fd 2 in JSON mode (see _relay_fd2): JSON lines pass, any other line
# (grpc's C core, "I1130 12:00:00.000000  42 file.cc:794] text") becomes one object.
_RELAY = r"""
import json, re, signal, sys, time
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)  # stop at EOF, i.e. once the broker is gone
ABSL = re.compile(rb"^([IWEF])\d{4} [\d:.]+ +\d+ ([^\]]+)\] ?(.*)$")
LEVEL = {b"I": "info", b"W": "warning", b"E": "error", b"F": "critical"}
out = sys.stdout.buffer
for raw in sys.stdin.buffer:
    line = raw.rstrip(b"\r\n")
    if not line.strip():
        continue
    if line.startswith(b"{") and line.endswith(b"}"):
        out.write(line + b"\n")
    else:
        t = time.time()
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % (t % 1 * 1000)
        m = ABSL.match(line)
        obj = {"ts": ts, "level": LEVEL[m[1]] if m else "warning",
               "logger": "grpc.core" if m else "stderr",
               "msg": (m[3] if m else line).decode("utf-8", "replace")}
        if m:
            obj["source"] = m[2].decode("utf-8", "replace")
        out.write(json.dumps(obj).encode() + b"\n")
    out.flush()
"""
_relay: subprocess.Popen[bytes] | None = None


def _relay_fd2() -> TextIO:
    """JSON mode: the stream for log records (the original stderr), after pointing fd 2 at
    a pipe into a relay process that turns whatever else is written there (grpc's C core,
    stray prints) into JSON lines. A process, not a thread: what the core writes just
    before an abort must outlive the broker. Records are written to the original stderr
    directly, so they are neither delayed nor lost with the relay."""
    global _relay
    sys.stderr.flush()
    original = os.dup(2)
    r, w = os.pipe()
    try:
        _relay = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _RELAY],
            stdin=r,
            stdout=original,
            stderr=subprocess.DEVNULL,
        )
    except OSError:
        os.close(r)
        os.close(w)
        os.close(original)
        return sys.stderr
    os.close(r)
    os.dup2(w, 2)
    os.close(w)
    return open(original, "w", buffering=1, encoding="utf-8", errors="replace")


def _is_fd2(stream: TextIO) -> bool:
    """sys.stderr is the process's fd 2 (not redirected, as main() run in-process may be):
    only then is there a descriptor for others to write past logging."""
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


def setup(fmt: str = "text", level: str = "INFO") -> None:
    """One handler on stderr for everything Python writes there: the broker's loggers,
    libraries' (alembic, asyncio, grpc's Python layer), warnings (logger py.warnings) and
    uncaught exceptions in any thread. In JSON mode every line on stderr is one object:
    what bypasses logging (grpc's C core, GRPC_VERBOSITY) goes through a relay."""
    relay = fmt == "json" and _relay is None and _is_fd2(sys.stderr)
    stream = _relay_fd2() if relay else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Alembic tells at INFO what every migration does ("Context impl SQLiteImpl.", "Will
    # assume transactional DDL.", each step); the broker logs the migration itself
    # ("store schema migrated", from and to), so alembic's lines are for --log-level DEBUG.
    quiet = root.getEffectiveLevel() > logging.DEBUG
    logging.getLogger("alembic").setLevel(logging.WARNING if quiet else logging.NOTSET)
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
