"""pasidctl as an operator meets it: help everywhere, usage errors (exit 2, JSON on request),
the session token kept off the command line, and `pasidctl bench` against a real broker."""

from __future__ import annotations

import argparse
import json
import os
import pty
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pasid_client import Client
from pasid_client import bench as pbench
from pasid_client.cli import build_parser

from tests.harness import ROOT, BrokerProcess, wait_until


def pasidctl(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """The real command, in a child process, as a shell would run it."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PASID_SESSION_")}
    return subprocess.run(
        [sys.executable, "-m", "pasid_client.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**base, **(env or {})},
        timeout=timeout,
    )


def _walk(p: argparse.ArgumentParser, path: str = "pasidctl") -> Iterator[tuple[str, object]]:
    """(where, action) for every action of the parser and of each subcommand's parser."""
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in a._choices_actions}
            for name, sub in a.choices.items():
                yield f"{path} {name}", helps.get(name)
                yield from _walk(sub, f"{path} {name}")
        else:
            yield f"{path} {'/'.join(a.option_strings) or a.dest}", a.help


def test_every_subcommand_and_option_has_help() -> None:
    seen = list(_walk(build_parser()))
    assert len(seen) > 60  # the walk reached the subcommands' options
    missing = [where for where, help_ in seen if not help_ or help_ == argparse.SUPPRESS]
    assert missing == []
    assert any(w == "pasidctl bench" for w, _ in seen)
    assert any(w == "pasidctl bench --alloc-ratio" for w, _ in seen)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["nope"], "invalid choice: 'nope'"),
        (["alloc", "--count", "x"], "invalid int value: 'x'"),
        (["info", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["alloc", "--token", "t", "--token-file", "f"], "not allowed with argument"),
        (["bench", "--alloc-ratio", "2"], "must be in [0, 1]"),
        (["bench", "--duration", "1", "--count", "5"], "not allowed with argument"),
        (["bench", "--concurrency", "0"], "must be at least 1"),
        (["alloc", "--session", "1"], "give --session (or PASID_SESSION_ID) and the token"),
        (["free", "--session", "1", "--token-file", "/nonexistent/t"], "cannot read the token"),
    ],
)
def test_usage_errors_exit_2_in_text_and_json(argv: list[str], says: str) -> None:
    # No broker: every one of these is refused before anything is asked of one.
    text = pasidctl(*argv, "--socket", "/nonexistent/broker.sock")
    assert text.returncode == 2, text.stderr
    assert says in text.stderr and text.stdout == ""
    as_json = pasidctl(*argv, "--socket", "/nonexistent/broker.sock", "--json")
    assert as_json.returncode == 2, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["error"]["code"] == "USAGE" and says in doc["error"]["message"]


def test_broker_refusals_still_exit_1_with_json(tmp_path: Path) -> None:
    """No broker at all: `info` waits --reconnect-deadline for one to start (saying so on
    stderr), then exits 1 with the error as JSON on stdout."""
    sock = str(tmp_path / "none.sock")
    r = pasidctl("info", "--json", "--timeout", "1", "--reconnect-deadline", "1", "--socket", sock)
    assert r.returncode == 1
    assert json.loads(r.stdout)["error"]["code"] == "UNAVAILABLE"
    assert "info: waiting for the broker" in r.stderr and "up to 1 s" in r.stderr, r.stderr


def test_token_from_environment_or_file_never_the_command_line(
    broker: BrokerProcess, client: Client, tmp_path: Path
) -> None:
    with client.session("vmm") as s:
        sock = ("--socket", broker.socket, "--json")
        sid = {"PASID_SESSION_ID": str(s.session_id)}
        by_env = pasidctl("alloc", *sock, env={**sid, "PASID_SESSION_TOKEN": s.token})
        assert by_env.returncode == 0, by_env.stderr
        token_file = tmp_path / "token"
        token_file.write_text(s.token + "\n")
        by_file = pasidctl("alloc", *sock, "--token-file", str(token_file), env=sid)
        assert by_file.returncode == 0, by_file.stderr
        by_file_env = pasidctl(
            "alloc", *sock, env={**sid, "PASID_SESSION_TOKEN_FILE": str(token_file)}
        )
        assert by_file_env.returncode == 0, by_file_env.stderr
        got = [json.loads(r.stdout)["pasids"] for r in (by_env, by_file, by_file_env)]
        assert sorted(p for g in got for p in g) == list(s.list().pasids()) == [1, 2, 3]
        # A wrong token in the file is the broker's refusal (exit 1), not a usage error.
        token_file.write_text("not-the-token\n")
        wrong = pasidctl("alloc", *sock, "--token-file", str(token_file), env=sid)
        assert wrong.returncode == 1 and json.loads(wrong.stdout)["error"]["code"] == "NOT_FOUND"
        assert list(s.list().pasids()) == [1, 2, 3]


def test_hold_writes_its_token_for_another_pasidctl(broker: BrokerProcess, tmp_path: Path) -> None:
    token_file = tmp_path / "hold.token"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PASID_SESSION_")}
    hold = subprocess.Popen(
        [
            *(sys.executable, "-m", "pasid_client.cli", "hold", "--socket", broker.socket),
            *("--count", "2", "--json", "--token-out", str(token_file)),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    try:
        assert hold.stdout is not None
        held = json.loads(hold.stdout.readline())
        assert token_file.read_text().strip() == held["token"]
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        r = pasidctl(
            "alloc",
            "--socket",
            broker.socket,
            "--session",
            str(held["session_id"]),
            "--token-file",
            str(token_file),
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["3"]
        # Never over an existing file: it may be another holder's.
        again = pasidctl("hold", "--socket", broker.socket, "--token-out", str(token_file))
        assert again.returncode == 2 and "exists already" in again.stderr
    finally:
        hold.send_signal(signal.SIGTERM)
        hold.wait(30)
    assert not token_file.exists()  # grace 0: the token died with the set
    with Client(broker.address) as c:
        wait_until(lambda: c.info().in_use == 0, what="the hold's set to be released")


def test_alloc_ratio_spreads_allocs_evenly() -> None:
    pattern = "".join("a" if pbench.is_alloc(i, 0.5) else "f" for i in range(6))
    assert pattern == "afafaf"
    assert sum(pbench.is_alloc(i, 0.25) for i in range(100)) == 25
    assert all(pbench.is_alloc(i, 1.0) for i in range(10))
    assert not any(pbench.is_alloc(i, 0.0) for i in range(10))
    assert pbench.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert pbench.percentile([float(i) for i in range(1, 101)], 99) == 99.0
    assert pbench.percentile([], 99) == 0.0


def test_bench_count_json_against_a_live_broker(broker: BrokerProcess, client: Client) -> None:
    r = pasidctl(
        "bench",
        *("--socket", broker.socket, "--json", "--count", "400"),
        *("--concurrency", "3", "--batch", "4", "--alloc-ratio", "0.5"),
    )
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["ops"] == s["alloc_ops"] + s["free_ops"] == 400
    # Each worker's own ops alternate alloc, free, ...: one extra alloc per odd share.
    assert 200 <= s["alloc_ops"] <= 203 and s["refused"] == {}
    assert s["pasids_allocated"] == 4 * s["alloc_ops"]
    assert s["pasids_freed"] == 4 * s["free_ops"]  # each free released one whole batch
    for kind in ("all", "alloc", "free"):
        lat = s["latency_ms"][kind]
        assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    assert s["ops_per_second"] > 0
    assert "\r" not in r.stdout and "\x1b[" not in r.stdout  # no bar into a pipe
    # Its sessions are gone, and so is everything they held.
    wait_until(lambda: client.info().sets == 0, what="the bench's sets to be destroyed")
    assert client.info().in_use == 0


def test_bench_counts_quota_refusals_and_goes_on(
    make_broker: Callable[..., BrokerProcess],
) -> None:
    b = make_broker("--quota-per-set", "10")
    r = pasidctl(
        "bench",
        *("--socket", b.socket, "--json", "--count", "30"),
        *("--concurrency", "1", "--batch", "3", "--alloc-ratio", "1"),
    )
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    # 3 batches of 3 fit in a set of 10; the 27 requests after them are refused.
    assert s["pasids_allocated"] == 9 and s["refused"] == {"QUOTA_EXCEEDED": 27}


def test_bench_duration_text_with_a_progress_bar_on_a_terminal(broker: BrokerProcess) -> None:
    primary, secondary = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PASID_SESSION_")}
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "pasid_client.cli", "bench", "--socket", broker.socket),
            *("--duration", "1", "--concurrency", "2"),
        ],
        stdout=secondary,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    os.close(secondary)
    out = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(primary)
    assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    text = out.decode()
    assert "\r[" in text and "%" in text  # the bar, redrawn in place
    assert "\x1b[2K" in text  # and wiped before the summary
    summary = text.rsplit("\x1b[2K", 1)[1]
    for line in ("bench ", "requests ", "throughput ", "latency ", "p50 ", "p99 ", "max "):
        assert line in summary


def test_a_reattached_hold_offers_no_empty_token(broker: BrokerProcess, tmp_path: Path) -> None:
    """A re-attach carries no token. `hold` run again for the same VMM (a restarted
    sidecar) used to print `export ... PASID_SESSION_TOKEN=` with nothing after it, and
    to write an empty --token-out file that `--token-file` then refused: it says what
    holds instead, and writes no file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PASID_SESSION_")}
    vmm = subprocess.Popen(["sleep", "120"])
    token_file = tmp_path / "vm.token"
    argv = [sys.executable, "-m", "pasid_client.cli", "hold", "--socket", broker.socket]
    argv += ["--count", "2", "--delegate-pid", str(vmm.pid), "--token-out", str(token_file)]
    holds: list[subprocess.Popen[str]] = []

    def hold() -> tuple[subprocess.Popen[str], list[str]]:
        p = subprocess.Popen(argv, stdout=-1, stderr=-1, text=True, cwd=ROOT, env=env)
        holds.append(p)
        assert p.stdout is not None
        lines = [p.stdout.readline() for _ in range(3)]
        return p, lines

    try:
        first, said = hold()
        assert "PASID_SESSION_TOKEN=" in said[1] and token_file.read_text().strip()
        first.send_signal(signal.SIGTERM)  # detaches (a sidecar stopped): the file stays
        assert first.wait(30) == 0
        token_file.unlink()
        again, said = hold()
        assert said[0].startswith("holding 2 PASIDs"), said
        assert "PASID_SESSION_TOKEN" not in "".join(said) and "re-attached" in said[1], said
        assert not token_file.exists()
        again.send_signal(signal.SIGINT)
        assert again.wait(30) == 0
        assert again.stderr is not None
        assert "nothing written to" in again.stderr.read()
    finally:
        for p in (*holds, vmm):
            if p.poll() is None:
                p.kill()
            p.wait()
