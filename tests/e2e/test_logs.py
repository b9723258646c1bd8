"""The broker's log as an operator reads it: JSON lines on request, text by default, every
session event naming its session and set, and never a resume token."""

from __future__ import annotations

import json
from collections.abc import Callable

from pasid_client import Client

from broker.engine import hash_token
from tests.harness import BrokerProcess, wait_until

LIFECYCLE = ("session opened", "session resumed", "session detached", "set destroyed")


def _session_lifecycle(b: BrokerProcess) -> list[str]:
    """Open with grace, detach, resume, end; and a grace-0 session. Returns the tokens."""
    with Client(b.address) as c:
        s = c.session("vm-logs", grace_seconds=30)
        s.alloc(count=2)
        token = s.token
        s.close()  # detached, kept for its grace
        with c.session(resume_token=token) as again:
            assert again.resumed
            again.alloc()
        with c.session("short") as short:
            short.alloc()
            other = short.token
        wait_until(lambda: c.info().sets == 1, what="the grace-0 set to be destroyed")
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
    assert destroyed[0]["reason"] == "client disconnected" and destroyed[0]["freed"] == 1
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
