"""Real broker processes for tests and benchmarks: start, wait for SERVING, kill, restart.

Nothing here is mocked: a subprocess runs the broker's main on a Unix socket in a fresh
directory with its own SQLite file, through the test launcher (`python -m
tests.faults.launch`, which adds the test-only vfio-fake backend and PASID_BROKER_TEST_FAULTS
and changes nothing else).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
# The daemons under test read PASID_BROKER_BACKEND themselves (the launcher registers the
# test-only vfio-fake): tests/e2e/conftest.py sets it for each e2e test, so that `make
# test` runs the e2e suite on the simulator and on the VFIO backend over the fake of the
# patched kernel.
LAUNCHER = "tests.faults.launch"


def backend() -> str:
    """The backend the brokers started now will use."""
    return os.environ.get("PASID_BROKER_BACKEND", "simulator")


def wait_until(
    pred: Callable[[], T], timeout: float = 10.0, interval: float = 0.01, what: str = "condition"
) -> T:
    """Poll `pred` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class BrokerProcess:
    """One `pasid-broker` daemon in its own directory (socket path kept short)."""

    def __init__(self, *args: str, workdir: str | None = None, env: dict[str, str] | None = None):
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="pb-", dir="/tmp"))
        self.socket = str(self.dir / "broker.sock")
        self.admin_socket = str(self.dir / "admin.sock")  # the daemon's default: beside socket
        self.db = str(self.dir / "broker.db")
        self.log = self.dir / "broker.log"
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"unix:{self.socket}"

    @property
    def admin_address(self) -> str:
        return f"unix:{self.admin_socket}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            LAUNCHER,
            "--db",
            self.db,
            "--socket",
            self.socket,
            "--log-format",
            "json",
            # Metrics on a free loopback port (read back with metrics_url), so that brokers
            # run side by side do not fight over the default one.
            *(
                []
                if any(a.startswith("--metrics-address") for a in self.args)
                else ["--metrics-address", "127.0.0.1:0"]
            ),
            *self.args,
        ]

    def start(self, wait: bool = True, timeout: float = 30.0) -> BrokerProcess:
        logf = self.log.open("ab")
        self.proc = subprocess.Popen(
            self.command(), stdout=logf, stderr=logf, env=self.env, cwd=ROOT
        )
        logf.close()
        if wait:
            self.wait_serving(timeout)
        return self

    def health(self, service: str = "", timeout: float = 1.0) -> str:
        """SERVING / NOT_SERVING / DOWN of `service` ("" readiness, "liveness"), via
        grpc.health.v1 as a probe would ask: each call connects anew (a local subchannel
        pool), as a probe process does, instead of sharing a subchannel that may still be
        backing off from a failed connect."""
        try:
            opts = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(self.address, options=opts) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=timeout
                )
                return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
        except grpc.RpcError:
            return "DOWN"

    def wait_serving(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"broker exited with {self.proc.returncode}:\n{self.read_log()}"
                )
            # No socket yet: health() would say DOWN, after making and tearing down a
            # channel (CPU the suite, bound by its two cores, spends at every start).
            return os.path.exists(self.socket) and self.health() == "SERVING"

        wait_until(ready, timeout, 0.02, "broker to serve")

    @property
    def metrics_url(self) -> str:
        """http://HOST:PORT/metrics of the current run, from its "serving" log line."""
        url = ""
        for line in self.read_log().splitlines():
            if '"metrics_url"' in line:
                url = json.loads(line)["metrics_url"]
        if not url or url == "off":
            raise AssertionError(f"broker logged no metrics endpoint:\n{self.read_log()}")
        return str(url)

    def read_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(30)

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        return self.kill(signal.SIGTERM)

    def restart(self, wait: bool = True) -> BrokerProcess:
        self.stop()
        return self.start(wait)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def run_broker_once(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run the daemon to completion (for start-up failures): its exit status and stderr."""
    # Metrics off unless asked for (a later flag wins): a start-up failure under test must
    # not turn into "port 9464 in use" on a machine where a broker already runs.
    return subprocess.run(
        [sys.executable, "-m", LAUNCHER, "--metrics-address", "off", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@contextlib.contextmanager
def open_db(db: str | Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to what the SQLite file holds. A live broker holds its file
    exclusively (no other process can read it), so its file is read through a copy made
    by SQLite's backup API on the broker's own connection (PasidAdmin.Backup, as
    `pasid-broker backup` makes it): what is committed, not what the engine remembers.
    A file no broker holds (a killed or stopped one's) is opened directly."""
    from broker.operate import _fetch
    from broker.service.instance import running_broker

    running = running_broker(str(db))
    if running is None:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            yield con
        finally:
            con.close()
        return
    assert running[1], f"{db}: its broker has no admin socket to copy it through"
    with tempfile.TemporaryDirectory(prefix="pbcopy-") as d:
        copy = Path(d) / "copy.db"
        _fetch(running[1], copy)
        con = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
        try:
            yield con
        finally:
            con.close()


def db_holdings(db: str | Path) -> dict[int, list[int]]:
    """Who holds what in the SQLite file (not what the broker's memory says: open_db)."""
    with open_db(db) as con:
        out: dict[int, list[int]] = {s: [] for (s,) in con.execute("SELECT set_id FROM sets")}
        for set_id, pasid in con.execute("SELECT set_id, pasid FROM allocations ORDER BY pasid"):
            out.setdefault(set_id, []).append(pasid)
        return out


def admin_address_of(address: str) -> str:
    """The admin socket the daemon places beside its clients' socket by default."""
    return address.rsplit("/", 1)[0] + "/admin.sock"


def api_holdings(address: str) -> dict[int, list[int]]:
    """Who holds what, as the broker serves it (PasidAdmin.ListSets on the admin socket
    beside `address`)."""
    from pasid_client import Client

    with Client(admin_address_of(address)) as c:
        return {s.set_id: sorted(s.pasids()) for s in c.list_sets()}


def assert_memory_matches_disk(b: BrokerProcess) -> dict[int, list[int]]:
    """The broker's answer and its file agree, and GetInfo counts the same PASIDs."""
    from pasid_client import Client

    api = api_holdings(b.address)
    disk = db_holdings(b.db)
    assert api == disk, f"memory {api} != disk {disk}"
    with Client(b.address) as c:
        assert c.info().in_use == sum(len(v) for v in api.values())
    return api
