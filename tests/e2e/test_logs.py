"""The broker's log as an operator reads it: JSON lines on request, text by default, every
session event naming its session and set, and never a resume token."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pasid_client import Client, InvalidRange, NotFound, QuotaExceeded

from broker.engine import hash_token
from broker.store import migrations
from tests.harness import ROOT, BrokerProcess, run_broker_once, wait_until

LIFECYCLE = ("session opened", "session resumed", "session detached", "set destroyed")


def _session_lifecycle(b: BrokerProcess) -> list[str]:
    """Open, detach, resume, detach again; and a session released by its close. Returns
    the tokens. (A verified holder's close() is a release since issue 19; a cancel of its
    stream, detach(), keeps the set detached while this process lives.)"""
    with Client(b.address) as c:
        s = c.session("vm-logs", grace_seconds=30)
        s.alloc(count=2)
        token = s.token
        s.detach()  # the stream broken, not released: detached, kept
        wait_until(
            lambda: any(v.detached_unix for v in c.held_sets()), what="the set to be detached"
        )
        again = c.session(resume_token=token)
        assert again.resumed
        again.alloc()
        again.detach()  # detached again, still held at the end
        with c.session("short") as short:
            short.alloc()
            other = short.token
        wait_until(lambda: c.info().sets == 1, what="the released set to be destroyed")
    return [token, other]


def test_json_log_lines_carry_ids_and_never_a_token(broker: BrokerProcess) -> None:
    tokens = _session_lifecycle(broker)
    broker.stop()
    text = broker.read_log()
    events = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert events, "empty log"
    for e in events:
        assert {"ts", "level", "logger", "msg"} <= set(e), e
    seen = {e["msg"] for e in events}
    for name in LIFECYCLE:
        assert name in seen, f"no {name!r} event"
    for e in events:
        if e["msg"] in LIFECYCLE:
            assert isinstance(e["session"], int) and e["set"] == e["session"], e
    opened = [e for e in events if e["msg"] == "session opened"]
    assert {e["client"] for e in opened} == {"vm-logs", "short"}
    destroyed = [e for e in events if e["msg"] == "set destroyed"]
    assert destroyed[0]["reason"] == "client released the set (half-closed its stream)"
    assert destroyed[0]["freed"] == 1
    for t in tokens:
        assert t not in text, "a resume token was logged"
        assert hash_token(t) not in text, "a token's hash was logged"


def test_text_log_is_the_default_format_and_carries_ids(
    make_broker: Callable[..., BrokerProcess],
) -> None:
    b = make_broker("--log-format", "text")  # the last flag wins over the harness's json
    tokens = _session_lifecycle(b)
    b.stop()
    text = b.read_log()
    lines = text.splitlines()
    assert lines and not any(line.lstrip().startswith("{") for line in lines)
    opened = [line for line in lines if "session opened" in line]
    assert opened and all(" session=" in line and " set=" in line for line in opened)
    for t in tokens:
        assert t not in text
    from broker.config import Config

    assert Config().log_format == "text"


def _json_lines(text: str) -> list[dict[str, object]]:
    """Every non-empty line as a JSON object; fails naming the first line that is not."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line on stderr: {line!r}") from None
        assert isinstance(obj, dict) and {"ts", "level", "logger", "msg"} <= set(obj), line
        out.append(obj)
    return out


def test_refusals_are_logged_at_info_with_their_reason(
    make_broker: Callable[..., BrokerProcess],
) -> None:
    b = make_broker("--quota-per-set", "2")
    with Client(b.address) as c:
        with c.session("vm-quota") as s:
            s.alloc(count=2)
            with pytest.raises(QuotaExceeded):
                s.alloc()  # on the session stream
            sid, token = s.session_id, s.token
            with pytest.raises(NotFound):
                c.alloc(sid, "not-the-token", 1, 100)  # unary, a bad token
            with pytest.raises(QuotaExceeded):
                c.alloc(sid, token, 1, 100)  # unary, the right token, over quota
        with pytest.raises(NotFound):
            c.session(resume_token="no-such-resume-token").close()
    b.stop()
    text = b.read_log()
    refused = [e for e in _json_lines(text) if str(e["msg"]).startswith("refused: ")]
    assert all(e["level"] == "info" for e in refused), refused
    quota = [e for e in refused if e["reason"] == "QUOTA_EXCEEDED"]
    assert len(quota) == 2
    stream = next(e for e in quota if e.get("op") == "alloc")
    assert stream["rpc"] == "Session" and stream["session"] == sid
    assert stream["client"] == "vm-quota"
    assert stream["quota"] == "set" and stream["limit"] == 2
    assert stream["code"] == "RESOURCE_EXHAUSTED"
    unary = next(e for e in quota if "op" not in e)
    assert unary["rpc"] == "Alloc" and unary["session"] == sid and unary["limit"] == 2
    bad = [e for e in refused if e["reason"] == "NOT_FOUND"]
    assert [e["rpc"] for e in bad] == ["Alloc", "Session"]  # a bad token; a bad resume
    assert bad[0]["session"] == sid and bad[0]["code"] == "NOT_FOUND"
    assert "session" not in bad[1] and "resume token" in str(bad[1]["msg"])
    for secret in (token, "not-the-token", "no-such-resume-token"):
        assert secret not in text


def test_every_stderr_line_of_a_live_broker_is_json(broker: BrokerProcess) -> None:
    # The harness runs the broker with --log-format json, stdout and stderr in one file.
    with Client(broker.address) as c, c.session("vm") as s:
        s.alloc(count=3)
        with pytest.raises(InvalidRange):
            s.alloc(9, 2)
        with pytest.raises(NotFound):
            c.free(s.session_id, "wrong", 0, 10)
    assert broker.stop() == 0  # SIGTERM: drain and stop are logged too
    events = _json_lines(broker.read_log())
    assert {"serving", "draining", "stopped"} <= {e["msg"] for e in events}


def test_json_mode_writes_warnings_and_uncaught_errors_as_json(tmp_path: Path) -> None:
    # What a live broker rarely does on cue: a library's warning, an exception nobody
    # catches in a thread and in the main thread. The same setup() as the daemon's.
    code = (
        "import threading, warnings\n"
        "from broker import logs\n"
        "logs.setup('json')\n"
        "warnings.warn('a library is unhappy', DeprecationWarning, stacklevel=1)\n"
        "t = threading.Thread(target=lambda: 1 / 0, name='worker'); t.start(); t.join()\n"
        "raise RuntimeError('boom')\n"
    )
    r = subprocess.run(
        [sys.executable, "-W", "always", "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 1
    events = _json_lines(r.stderr)
    warned = next(e for e in events if e["logger"] == "py.warnings")
    assert "a library is unhappy" in str(warned["msg"]) and warned["level"] == "warning"
    thread = next(e for e in events if "thread worker" in str(e["msg"]))
    assert "ZeroDivisionError" in str(thread["exc"])
    main = next(e for e in events if e["msg"] == "uncaught exception")
    assert main["level"] == "critical" and "RuntimeError: boom" in str(main["exc"])


def test_a_refusal_to_start_in_json_mode_is_json() -> None:
    r = run_broker_once("--log-format", "json", "--db", "/proc/no-such-dir/broker.db")
    assert r.returncode != 0
    events = _json_lines(r.stderr)
    assert events and events[-1]["level"] in ("error", "critical")


def test_grpc_core_lines_become_json_in_json_mode() -> None:
    # grpc's C core writes to fd 2 itself; at GRPC_VERBOSITY=debug it says so at start.
    b = BrokerProcess(env={"GRPC_VERBOSITY": "debug"})
    try:
        b.start()
        with Client(b.address) as c:
            c.info()
        assert b.stop() == 0
        wait_until(lambda: '"grpc.core"' in b.read_log(), what="the relay to pass it on")
        text = b.read_log()
        events = _json_lines(text)
        core = [e for e in events if e["logger"] == "grpc.core"]
        assert core and all(e["level"] in ("info", "warning", "error", "critical") for e in core)
        assert any("not suitable for production" in str(e["msg"]) for e in core)
        assert all(":" in str(e["source"]) for e in core)  # file.cc:line
    finally:
        b.cleanup()


def test_the_start_log_has_no_alembic_chatter_unless_debug() -> None:
    """A start that migrates a store says so once ("store schema migrated", from and to);
    alembic's own INFO lines ("Context impl SQLiteImpl.", "Will assume transactional
    DDL.", "Running upgrade ...") appear only at --log-level DEBUG. The store migrated
    is the first release's (a new one is made without Alembic, from head_schema.py), and
    a new store's first start says the same line, from "empty"."""
    from tests.store.test_migrations import make_v1_db

    b = BrokerProcess()
    try:
        b.start()
        assert b.stop() == 0
        [created] = [e for e in _json_lines(b.read_log()) if e["msg"] == "store schema migrated"]
        assert (created["from"], created["to"]) == ("empty", migrations.HEAD)
    finally:
        b.cleanup()
    logs = {}
    for level in ("INFO", "DEBUG"):
        b = BrokerProcess("--log-level", level)
        try:
            make_v1_db(Path(b.db))
            b.start()
            assert b.stop() == 0
            logs[level] = _json_lines(b.read_log())
        finally:
            b.cleanup()
    info = logs["INFO"]
    assert [e for e in info if str(e["logger"]).startswith("alembic")] == []
    assert not any(
        "SQLiteImpl" in str(e["msg"]) or "transactional DDL" in str(e["msg"]) for e in info
    )
    [migrated] = [e for e in info if e["msg"] == "store schema migrated"]
    assert (migrated["from"], migrated["to"]) == ("0001", migrations.HEAD)
    chatter = {str(e["msg"]) for e in logs["DEBUG"] if str(e["logger"]).startswith("alembic")}
    assert "Context impl SQLiteImpl." in chatter, chatter
