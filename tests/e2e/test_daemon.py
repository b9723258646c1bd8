"""The daemon as an operator meets it: help, refusals at start, SIGTERM."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable

import pytest
from pasid_client import Client

from broker.config import build_parser as broker_parser
from tests.harness import ROOT, BrokerProcess, backend, run_broker_once, wait_until


def pasidctl(b: BrokerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real pasidctl against `b`, as an operator at a shell would."""
    return subprocess.run(
        [sys.executable, "-m", "pasid_client.cli", *args, "--socket", b.socket],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def _flags(parser: object) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")}  # type: ignore[attr-defined]


@pytest.mark.backend_pinned  # starts no broker
def test_broker_help_explains_every_flag() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "broker", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    for flag in _flags(broker_parser()) - {"--help"}:
        m = re.search(re.escape(flag) + r"[ =A-Z_{},a-z-]*\n?\s+(\S.*)", out)
        assert m, f"{flag} has no help text"
        env = "PASID_BROKER_" + flag[2:].upper().replace("-", "_")
        if flag not in ("--help", "--version", "--print-config"):
            assert env in out, f"{flag}: its environment variable {env} is not documented"


@pytest.mark.backend_pinned  # starts no broker
def test_pasidctl_help_covers_every_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pasid_client.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    for cmd in (
        "info",
        "alloc",
        "free",
        "list",
        "hold",
        "watch",
        "sets",
        "revoke",
        "quota",
        "request",
        "top",
        "bench",
    ):
        assert re.search(rf"^\s+{cmd}\s+\S", out, re.M), f"pasidctl {cmd} undocumented"
        sub = subprocess.run(
            [sys.executable, "-m", "pasid_client.cli", cmd, "--help"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout
        assert "--json" in sub and "--socket" in sub


@pytest.mark.backend_pinned  # loads the settings in-process, no broker
def test_env_configures_the_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    from broker import config

    # `make test`'s second pass selects the daemons' backend with PASID_BROKER_BACKEND=
    # vfio-fake, which only the test launcher registers; this in-process load has none.
    monkeypatch.delenv("PASID_BROKER_BACKEND", raising=False)
    monkeypatch.setenv("PASID_BROKER_QUOTA_PER_SET", "7")
    monkeypatch.setenv("PASID_BROKER_RESERVED", "1-63,100")
    cfg = config.load([])
    assert cfg.quotas.per_set == 7 and cfg.reserved == ((1, 63), (100, 100))
    assert config.load(["--quota-per-set", "9"]).quotas.per_set == 9  # flag beats env
    assert cfg.quarantine.seconds == 0 and cfg.quarantine.allocs == 0  # off by default
    monkeypatch.setenv("PASID_BROKER_QUARANTINE_SECONDS", "2.5")
    monkeypatch.setenv("PASID_BROKER_QUARANTINE_ALLOCS", "64")
    q = config.load([]).quarantine
    assert (q.seconds, q.allocs) == (2.5, 64)


@pytest.mark.backend_pinned  # its daemon's backend is --backend vfio
def test_vfio_backend_without_vfio_refuses_clearly(tmp_path: object) -> None:
    if os.path.exists("/dev/vfio/vfio"):
        pytest.skip("this machine has /dev/vfio/vfio; the refusal is tested where it has not")
    r = run_broker_once(
        "--backend", "vfio", "--db", f"{tmp_path}/b.db", "--socket", f"{tmp_path}/b.sock"
    )
    assert r.returncode == 2
    assert "cannot start: vfio backend: open(/dev/vfio/vfio) failed: ENOENT" in r.stderr
    assert "VFIO_IOMMU_PASID_REQUEST" in r.stderr  # what kernel support is needed
    assert "--vfio-fallback simulator" in r.stderr and "--backend simulator" in r.stderr


@pytest.mark.backend_pinned  # its daemon's backend is --backend vfio
def test_vfio_backend_fallback_serves_with_the_simulator(
    make_broker: Callable[..., BrokerProcess],
) -> None:
    if os.path.exists("/dev/vfio/vfio"):
        pytest.skip("this machine has /dev/vfio/vfio; the fallback is tested where it has not")
    b = make_broker("--backend", "vfio", "--vfio-fallback", "simulator")
    with Client(b.address) as c, c.session("vm") as s:
        assert s.alloc(1, 10) == [1]
        assert c.info().backend == "simulator"
    log = b.read_log()
    assert "backend vfio refused" in log and "NOT allocated in the kernel" in log


def test_second_broker_on_the_same_db_refuses(broker: BrokerProcess) -> None:
    r = run_broker_once("--db", broker.db, "--socket", broker.socket + "2")
    assert r.returncode == 2
    assert f"{broker.db} is in use by pid {broker.proc.pid}" in r.stderr  # type: ignore[union-attr]
    assert broker.health() == "SERVING"


def test_pasidctl_json_and_errors(broker: BrokerProcess) -> None:
    import json

    with Client(broker.address) as c, c.session("vm") as s:
        s.alloc(1, 10, count=3)
        info = json.loads(pasidctl(broker, "info", "--json").stdout)
        assert info["in_use"] == 3 and info["backend"] == backend()
        env_args = ("--session", str(s.session_id), "--token", s.token)
        r = pasidctl(broker, "alloc", "--count", "2", "--json", *env_args)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert got["pasids"] == [4, 5]
        assert json.loads(
            pasidctl(broker, "free", "--min", "4", "--max", "4", "--json", *env_args).stdout
        ) == {
            "session_id": s.session_id,
            "freed": 1,
        }
        listed = json.loads(pasidctl(broker, "list", "--all", "--json").stdout)
        assert listed["sets"][0]["ranges"] == [[1, 3], [5, 5]]
        bad = pasidctl(broker, "alloc", "--min", "9", "--max", "2", *env_args)
        assert bad.returncode == 1 and "INVALID_ARGUMENT: min 9 > max 2" in bad.stderr


def test_sigterm_drains_and_keeps_sets_for_restart(
    make_broker: Callable[..., BrokerProcess],
) -> None:
    b = make_broker("--restart-grace", "30")
    with Client(b.address, reconnect_deadline_seconds=0) as c:  # resumed by hand below
        s = c.session("vmm", grace_seconds=0)
        got = s.alloc(1, 10, count=2)
        token = s.token
        assert b.stop() == 0
        b.start()
        with Client(b.address) as c2:
            # a broker restart is not the client's exit: the set waits for its resume
            assert c2.info().in_use == 2
            with c2.session(resume_token=token) as again:
                assert list(again.list().pasids()) == got


def test_session_tokens_never_look_like_options(broker: BrokerProcess) -> None:
    """A token is typed after `--token`: one that began with '-' was read by argparse as an
    option, and pasidctl failed with a usage error about 1 time in 64 (url-safe base64)."""
    with Client(broker.address) as c:
        for _ in range(200):
            with c.session("token-shape") as s:
                assert s.token and not s.token.startswith("-"), s.token
        s = c.session("vmm", grace_seconds=30)
        r = pasidctl(broker, "alloc", "--session", str(s.session_id), "--token", s.token)
        assert r.returncode == 0, r.stderr


def test_pasidctl_admin_watch_and_request(broker: BrokerProcess) -> None:
    import json

    with Client(broker.address) as c:
        s = c.session("vmm", grace_seconds=30)
        ref = ("--session", str(s.session_id), "--token", s.token)
        r = pasidctl(broker, "request", "--flags", "1", "--min", "7", "--max", "9", *ref)
        assert (r.returncode, r.stdout) == (0, "7\n"), r.stderr
        bad = pasidctl(
            broker, "request", "--flags", "3", "--min", "7", "--max", "9", "--json", *ref
        )
        assert bad.returncode == 1
        assert json.loads(bad.stdout)["error"]["code"] == "INVALID_ARGUMENT"
        sets = json.loads(pasidctl(broker, "sets", "--json").stdout)["sets"]
        assert [(x["client"], x["count"], x["peer"]) for x in sets] == [("vmm", 1, "unix:")]
        q = json.loads(
            pasidctl(broker, "quota", "--set", str(s.session_id), "--per-set", "5", "--json").stdout
        )
        assert q["set_id"] == s.session_id
        events = [
            json.loads(line)
            for line in pasidctl(
                broker, "watch", "--from", "1", "--count", "2", "--json"
            ).stdout.splitlines()
        ]
        assert [(e["revision"], e["kind"]) for e in events] == [(1, "set_created"), (2, "alloc")]
        assert events[1]["ranges"] == [[7, 7]]
        out = pasidctl(broker, "revoke", str(s.session_id), "--reason", "test")
        assert out.returncode == 0 and "1 PASIDs freed" in out.stdout
        assert c.info().in_use == 0


def test_tokens_never_reach_the_log(broker: BrokerProcess, client: Client) -> None:
    s = client.session("vmm", grace_seconds=30)
    s.alloc(1, 3)
    token = s.token
    s.detach()  # a broken stream detaches it (close() would release it, issue 19)
    wait_until(lambda: any(v.detached_unix for v in client.held_sets()), what="detached")
    with client.session(resume_token=token) as again:
        again.free()
    broker.stop()
    log = broker.read_log()
    assert "session resumed" in log and "session opened" in log
    assert token not in log


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--pasid-bits", "32"), "reports pasid_bits 32 > 31, the most the wire"),
        (("--pasid-bits", "40"), "reports pasid_bits 40 > 31, the most the wire"),
        (("--reserved", "1-2000000"), "reserved range [1, 2000000]: max 2000000 >= 2^20"),
    ],
)
def test_too_wide_a_backend_or_reserved_range_refuses_to_start(
    tmp_path: object, args: tuple[str, ...], message: str
) -> None:
    r = run_broker_once("--db", f"{tmp_path}/b.db", "--socket", f"{tmp_path}/b.sock", *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr


def test_common_options_work_before_and_after_the_command(broker: BrokerProcess) -> None:
    """`pasidctl --socket X info` and `pasidctl info --socket X` both reach X (the
    subcommand's default used to overwrite a value given before the command)."""
    import json

    before = subprocess.run(
        [sys.executable, "-m", "pasid_client.cli", "--socket", broker.socket, "--json", "info"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PASID_BROKER_SOCKET": ""},
    )
    assert before.returncode == 0, before.stderr
    after = pasidctl(broker, "info", "--json")
    assert after.returncode == 0, after.stderr
    b, a = json.loads(before.stdout), json.loads(after.stdout)
    assert (b["backend"], b["capacity"]) == (a["backend"], a["capacity"])


@pytest.mark.backend_pinned  # its daemon's backend is --backend iommufd
def test_iommufd_backend_without_iommufd_refuses_in_one_line(tmp_path: object) -> None:
    if os.path.exists("/dev/iommu"):
        pytest.skip("this machine has /dev/iommu; the refusal is tested where it has not")
    r = run_broker_once(
        "--backend", "iommufd", "--db", f"{tmp_path}/b.db", "--socket", f"{tmp_path}/b.sock"
    )
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("pasid-broker: cannot start")]
    assert len(lines) == 1, r.stderr  # (the log has it too, with its timestamp)
    assert "iommufd backend: this kernel has no /dev/iommu" in lines[0]
    assert "CONFIG_IOMMUFD" in lines[0] and "errno" not in lines[0].lower()
