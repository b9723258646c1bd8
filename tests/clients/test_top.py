"""`pasidctl top` against a real broker, and its rate arithmetic on known samples."""

from __future__ import annotations

import json
import subprocess
import sys

from pasid_client import Client, Info, Quotas, SetView
from pasid_client import top as ptop

from tests.harness import ROOT, BrokerProcess, wait_until


def _info(in_use: int, capacity: int = 1000) -> Info:
    return Info("simulator", 10, capacity, in_use, 1, 0, 0, Quotas(0, 0, 0), "t")


def _set(set_id: int, client: str, count: int, state: str = "attached") -> SetView:
    return SetView(set_id, set_id, client, 0, count, (), state, 0.0)


def test_frame_rates_and_holders_from_two_samples() -> None:
    prev = ptop.Sample(10.0, _info(15), (_set(1, "a", 10), _set(2, "b", 5)))
    cur = ptop.Sample(
        12.0,
        _info(16),
        (_set(1, "a", 4), _set(3, "c", 8), _set(4, "c", 4, "detached")),  # b is gone
    )
    f = ptop.frame(prev, cur, top=2)
    # gained: c 8 + 4 = 12; lost: a 6 + b 5 = 11; over 2 s
    assert f["allocated_per_second"] == 6.0 and f["released_per_second"] == 5.5
    assert f["utilisation"] == 16 / 1000 and f["detached_sets"] == 1 and f["clients"] == 2
    assert f["top"] == [
        {"client": "c", "pasids": 12, "sets": 2, "detached": 1},
        {"client": "a", "pasids": 4, "sets": 1, "detached": 0},
    ]
    first = ptop.frame(None, cur)
    assert first["allocated_per_second"] is None
    assert "after the next refresh" in ptop.render(first)
    assert "+6.0/s allocated, -5.5/s released" in ptop.render(f)


def test_samples_from_a_live_broker_show_the_traffic(
    broker: BrokerProcess, client: Client, admin: Client
) -> None:
    with client.session("vm-a") as a, client.session("vm-b") as b:
        b.alloc(count=6)
        before = ptop.sample(admin)
        a.alloc(count=5)
        b.free(1, 1000)
        with client.session("vm-c") as c:
            c.alloc(count=2)
        wait_until(lambda: client.info().sets == 2, what="vm-c's set to be reclaimed")
        after = ptop.sample(admin)
        f = ptop.frame(before, after)
        dt = after.t - before.t
        assert round(f["allocated_per_second"] * dt) == 5  # vm-c came and went in between
        assert round(f["released_per_second"] * dt) == 6
        assert f["in_use"] == client.info().in_use == 5
        assert f["top"][0] == {"client": "vm-a", "pasids": 5, "sets": 1, "detached": 0}


def _pasidctl(b: BrokerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pasid_client.cli", "top", "--socket", b.socket, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_pasidctl_top_once_json_and_text(broker: BrokerProcess, client: Client) -> None:
    with client.session("qemu-1") as s, client.session("qemu-2", grace_seconds=5) as s2:
        s.alloc(count=30)
        s2.alloc(count=12)
        r = _pasidctl(broker, "--once", "--json", "--interval", "0.1")
        assert r.returncode == 0, r.stderr
        f = json.loads(r.stdout)
        info = client.info()
        assert f["in_use"] == info.in_use == 42 and f["capacity"] == info.capacity
        assert [h["client"] for h in f["top"]] == ["qemu-1", "qemu-2"]
        assert f["allocated_per_second"] == 0.0 and f["interval_seconds"] > 0
        r = _pasidctl(broker, "--count", "2", "--interval", "0.1", "--top", "1")
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("utilisation [") == 2
        assert "qemu-1" in r.stdout and "qemu-2" not in r.stdout  # --top 1
        assert "\x1b[" not in r.stdout  # no screen clearing into a pipe


def test_pasidctl_top_without_a_broker_waits_then_fails_clearly(tmp_path: object) -> None:
    """No broker within --reconnect-deadline: top (--once too) waited for one, said so,
    and then fails with the last UNAVAILABLE."""
    sock = f"{tmp_path}/none.sock"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pasid_client.cli",
            "top",
            "--once",
            "--timeout",
            "2",
            "--reconnect-deadline",
            "1",
            "--socket",
            sock,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 1 and "UNAVAILABLE" in r.stderr
    assert r.stderr.startswith("pasidctl: top: waiting for the broker ("), r.stderr
    assert r.stderr.count("waiting") == 1, r.stderr
    h = subprocess.run(
        [sys.executable, "-m", "pasid_client.cli", "top", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert "--once" in h.stdout and "--json" in h.stdout and "net" in h.stdout
