"""Every refusal to start is ONE line on stderr and exit 2: the cases of issue 13, each
against a real `python -m broker` process (no traceback, nothing bound, nothing left)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.other_uid import setpriv
from tests.harness import ROOT

PREFIX = "pasid-broker: cannot start: "


@dataclass
class Case:
    args: list[str]
    expect: str  # a fragment of the one stderr line
    env: dict[str, str] = field(default_factory=dict)
    # A wrapper command (setpriv, unshare) and what it needs to run, or a skip reason.
    wrap: Callable[[Path], list[str] | str] | None = None
    toml: str | None = None
    link: tuple[str, str] | None = None  # a symlink in the work dir: (name, target)


def _as_nobody(d: Path) -> list[str] | str:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return "needs root and setpriv to run the broker as an unprivileged user"
    return setpriv()


def _readonly_mount(d: Path) -> list[str] | str:
    """The broker in a private mount namespace where d/ro is a read-only tmpfs."""
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "true"], capture_output=True, text=True
    )
    if shutil.which("unshare") is None or probe.returncode != 0:
        return f"cannot make a mount namespace here: {probe.stderr.strip()}"
    (d / "ro").mkdir()
    mount = f'mount -t tmpfs -o ro tmpfs {d}/ro && exec "$@"'
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", mount, "sh"]


def run_broker(
    workdir: Path, *args: str, wrap: list[str] | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m broker` on a database and socket in `workdir`, no metrics port."""
    cmd = [*(wrap or []), sys.executable, "-m", "broker", "--db", f"{workdir}/b.db",
           "--socket", f"{workdir}/b.sock", "--metrics-address", "off", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT, env=env)


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pbc-", dir="/tmp"))
    d.chmod(0o755)  # an unprivileged broker must reach it
    yield d
    subprocess.run(["chmod", "-R", "u+w", str(d)], check=False)
    shutil.rmtree(d, ignore_errors=True)


def _taken_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


CASES: dict[str, Case] = {
    "negative restart grace": Case(["--restart-grace", "-5"], "--restart-grace '-5': must be >= 0"),
    "negative drain": Case(["--drain-seconds", "-1"], "--drain-seconds '-1': must be >= 0"),
    "zero keepalive": Case(["--keepalive-seconds", "0"], "--keepalive-seconds '0': must be > 0"),
    "negative set quota": Case(["--quota-per-set", "-1"], "--quota-per-set '-1': must be >= 0"),
    "negative event retention": Case(
        ["--event-retention", "-1"], "--event-retention '-1': must be >= 1"
    ),
    "listen port out of range": Case(
        ["--listen", "127.0.0.1:99999"], "--listen '127.0.0.1:99999': port 99999 outside 0..65535"
    ),
    "listen host malformed": Case(["--listen", "no such:80"], "'no such' is not a host name"),
    "listen host unknown": Case(
        ["--listen", "no-such-host.invalid:50051", "--insecure"],
        "--listen no-such-host.invalid:50051 is not a loopback address and has no TLS",
    ),
    "listen port in use": Case(
        ["--listen", "127.0.0.1:{taken}", "--insecure"], "Address already in use"
    ),
    "metrics port out of range": Case(
        ["--metrics-address", ":99999"], "--metrics-address ':99999': port 99999 outside 0..65535"
    ),
    "metrics port in use": Case(
        ["--metrics-address", "127.0.0.1:{taken}"], "cannot serve metrics on 127.0.0.1:"
    ),
    "socket path too long": Case(
        ["--socket", "{dir}/" + "s" * 120 + ".sock"], "bytes, over the 107 a Unix socket path"
    ),
    "default admin socket too long": Case(
        # The socket fits; admin.sock and peer.sock beside it would not (issue 21).
        ["--socket", "{dir}/" + "d" * 84 + "/s"],
        "admin socket {dir}/" + "d" * 84 + "/admin.sock (beside --socket): 113 bytes",
    ),
    "socket mode 0": Case(["--socket-mode", "0"], "--socket-mode '0': 0000 lets no one connect"),
    "socket mode without write": Case(
        ["--socket-mode", "0444"], "--socket-mode '0444': 0444 lets no one connect"
    ),
    "admin socket is the socket": Case(
        ["--admin-socket", "{dir}/b.sock"],
        "--admin-socket {dir}/b.sock is the same file as --socket {dir}/b.sock",
    ),
    "peer socket is the socket": Case(
        ["--peer-socket", "{dir}/b.sock"],
        "--peer-socket {dir}/b.sock is the same file as --socket {dir}/b.sock",
    ),
    "database is the socket": Case(
        ["--db", "{dir}/b.sock"], "--socket {dir}/b.sock is the same file as --db {dir}/b.sock"
    ),
    "database is the admin socket by default": Case(
        ["--db", "{dir}/admin.sock"],
        "the default --admin-socket {dir}/admin.sock is the same file as --db",
    ),
    "database is the socket's lock": Case(
        ["--db", "{dir}/b.sock.lock"],
        "--socket {dir}/b.sock and --db {dir}/b.sock.lock would both use {dir}/b.sock.lock",
    ),
    "database through a symlink to the socket": Case(
        ["--db", "{dir}/link.db"],
        "--socket {dir}/b.sock is the same file as --db {dir}/link.db",
        link=("link.db", "b.sock"),
    ),
    "malformed environment value": Case(
        [],
        "PASID_BROKER_DRAIN_SECONDS='soon': not a number",
        {"PASID_BROKER_DRAIN_SECONDS": "soon"},
    ),
    "misspelled environment variable": Case(
        [],
        "unknown environment variable PASID_BROKER_QUOTA_PERSET (did you mean "
        "PASID_BROKER_QUOTA_PER_SET?)",
        {"PASID_BROKER_QUOTA_PERSET": "5"},
    ),
    "test faults outside the test launcher": Case(
        [],
        "unknown environment variable PASID_BROKER_TEST_FAULTS",
        {"PASID_BROKER_TEST_FAULTS": "ack_before_commit"},
    ),
    "misspelled flag": Case(["--restart-grase", "5"], "(did you mean --restart-grace?)"),
    "unknown config file key": Case(
        ["--config", "{dir}/broker.toml"],
        "unknown key 'quota_per_sett' (did you mean quota_per_set?)",
        toml="quota_per_sett = 5\n",
    ),
    "bad config file value": Case(
        ["--config", "{dir}/broker.toml"],
        "drain_seconds = -2 in {dir}/broker.toml: must be >= 0",
        toml="drain_seconds = -2\n",
    ),
    "config file not TOML": Case(
        ["--config", "{dir}/broker.toml"], "not TOML", toml="drain_seconds = \n"
    ),
    "config file missing": Case(
        ["--config", "{dir}/nope.toml"], "config file {dir}/nope.toml: No such file"
    ),
    "unknown socket group": Case(["--socket-group", "no-such-group-x"], "no group named"),
    "database directory not writable": Case(
        ["--db", "{dir}/locked/b.db"],
        "cannot create database directory {dir}/locked: Permission denied",
        wrap=_as_nobody,
    ),
    "socket directory not writable": Case(
        ["--socket", "{dir}/rodir/b.sock", "--db", "{dir}/free/b.db"],
        "socket directory {dir}/rodir is not writable by this user",
        wrap=_as_nobody,
    ),
    "database on a read-only mount": Case(
        ["--db", "{dir}/ro/b.db"],
        "database directory {dir}/ro is on a read-only file system",
        wrap=_readonly_mount,
    ),
}


# A case that makes a mount namespace copies the host's mounts (and would keep a loop
# device of another test busy): on the loop-device tests' worker (tests/conftest.py).
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xdist_group("blockdev"))
        if CASES[n].wrap is _readonly_mount
        else n
        for n in CASES
    ],
)
def test_refusal_is_one_line_and_exit_2(name: str, workdir: Path) -> None:
    case = CASES[name]
    taken, port = _taken_port()
    try:
        fill = {"dir": str(workdir), "taken": str(port)}
        args = [a.format(**fill) for a in case.args]
        if case.toml is not None:
            (workdir / "broker.toml").write_text(case.toml)
        if case.link is not None:
            (workdir / case.link[0]).symlink_to(workdir / case.link[1])
        (workdir / "rodir").mkdir()
        (workdir / "free").mkdir(mode=0o777)
        (workdir / "free").chmod(0o777)
        wrap: list[str] = []
        if case.wrap is not None:
            got = case.wrap(workdir)
            if isinstance(got, str):
                print(f"\nSKIP {name}: {got}")
                pytest.skip(got)
            wrap = got
        env = {k: v for k, v in os.environ.items() if not k.startswith("PASID_BROKER_")}
        r = run_broker(workdir, *args, wrap=wrap, env={**env, **case.env})
    finally:
        taken.close()
    lines = r.stderr.splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1, f"want one line on stderr, got:\n{r.stderr}"
    assert lines[0].startswith(PREFIX), lines[0]
    assert case.expect.format(**fill) in lines[0]
    assert r.stdout == ""
    assert not (workdir / "b.sock").exists(), "a refused start left its socket behind"


def test_malformed_environment_does_not_break_help_or_version() -> None:
    env = {**os.environ, "PASID_BROKER_DRAIN_SECONDS": "soon", "PASID_BROKER_TYPO": "1"}
    for flag, expect in (("--help", "PASID_BROKER_DRAIN_SECONDS"), ("--version", "pasid-broker ")):
        r = subprocess.run(
            [sys.executable, "-m", "broker", flag],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
            env=env,
        )
        assert r.returncode == 0, r.stderr
        assert expect in r.stdout


def test_refusal_in_json_log_mode_is_one_json_line(workdir: Path) -> None:
    import json

    (workdir / "b.db").write_text("not a database")
    r = run_broker(workdir, "--log-format", "json")
    assert r.returncode == 2, r.stderr
    last = json.loads(r.stderr.splitlines()[-1])
    assert last["level"] == "error" and last["msg"].startswith("cannot start: ")
    assert "Traceback" not in r.stderr
    for line in r.stderr.splitlines():
        json.loads(line)  # every line a JSON object
    # A setting refused before the logs are set up: JSON too, when JSON was asked for.
    bad = subprocess.run(
        [sys.executable, "-m", "broker", "--log-format", "json", "--drain-seconds", "-1"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert bad.returncode == 2
    (line,) = bad.stderr.splitlines()
    assert "--drain-seconds '-1': must be >= 0" in json.loads(line)["msg"]
