"""Crash test: clients allocate and free at full speed while the broker is SIGKILLed.

    python -m tests.crash.crashtest --kills 100        (make crash-test)

Real processes throughout: one broker (tests.harness.BrokerProcess) and several worker
processes (this module's `worker` mode), each with a session of grace > 0 and a ledger
file. A worker writes a line *before* each request (the op is then "uncertain") and one
after its answer (acknowledged, or refused). When the broker dies, workers wait for the
controller to finish its checks, then resume their sessions with their tokens and re-read
their sets.

After every kill, on the SQLite file of the dead broker, and again through the API of
the restarted broker (before any worker comes back), for every live worker:
  acknowledged, not freed and no free of it uncertain   is a subset of   held by its set
  held by its set   is a subset of   acknowledged + uncertain (allocs: by count)
and: no PASID in two sets, memory equals disk, and the sets of workers killed on purpose
are gone (after their grace while the broker runs; at once after a restart, since their
pid is dead). Any broken rule is a violation; the exit status is 1 if there is one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import ROOT, BrokerProcess, api_holdings, db_holdings, wait_until

PASID_MAX = (1 << 20) - 1


# -- the worker process -----------------------------------------------------------------


def _read_gen(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def worker(address: str, ledger_path: str, gen_file: str, grace: int, seed: int) -> None:
    from pasid_client import Client, PasidClientError, ResourceExhausted

    rng = random.Random(seed)
    gen_path = Path(gen_file)
    ledger = open(ledger_path, "a", buffering=1)  # noqa: SIM115 - one line, one write

    def note(**kv: object) -> None:
        ledger.write(json.dumps(kv, separators=(",", ":")) + "\n")

    token = ""
    held: set[int] = set()
    n = 0
    while True:
        gen = _read_gen(gen_path)
        # Resumed by hand below, after the controller's checks: no reconnect of its own.
        client = Client(address, timeout=10, reconnect_deadline_seconds=0)
        try:
            if not token:
                s = client.session(f"crash-{os.getpid()}", grace_seconds=grace)
                token = s.token
                note(op="session", sid=s.session_id, gen=gen)
            else:
                s = client.session(resume_token=token)
                held = set(s.list().pasids())
                note(op="resync", pasids=sorted(held), gen=gen)
            while True:
                n += 1
                if held and (len(held) > 64 or rng.random() < 0.45):
                    lo = rng.choice(sorted(held))
                    hi = lo + rng.randint(0, 3)
                    expect = sorted(p for p in held if lo <= p <= hi)
                    note(op="free?", n=n, lo=lo, hi=hi)
                    freed = s.free(lo, hi)
                    note(op="free", n=n, freed=expect)
                    if freed != len(expect):
                        note(op="mismatch", n=n, got=freed, want=len(expect))
                    held.difference_update(expect)
                else:
                    k = rng.randint(1, 4)
                    note(op="alloc?", n=n, k=k)
                    try:
                        got = s.alloc(1, PASID_MAX, k)
                    except ResourceExhausted:
                        note(op="refused", n=n)
                        continue
                    note(op="alloc", n=n, pasids=got)
                    held.update(got)
        except PasidClientError as exc:
            note(op="fail", err=f"{exc.code.name}: {exc.message}"[:200])
            if exc.code.name == "NOT_FOUND":
                note(op="lost")
        finally:
            client.close()
        while _read_gen(gen_path) <= gen:  # wait for the controller's checks
            time.sleep(0.02)


# -- the controller's view of a ledger --------------------------------------------------


@dataclass
class Ledger:
    """What one worker was told, read incrementally from its ledger file."""

    path: Path
    sid: int | None = None
    connected: bool = False  # its last line is a session/resync, not a failure
    acked: set[int] = field(default_factory=set)  # acknowledged and not freed
    pending_alloc: dict[int, int] = field(default_factory=dict)  # n -> count, uncertain
    pending_free: dict[int, set[int]] = field(default_factory=dict)  # n -> PASIDs, uncertain
    allocs: int = 0
    frees: int = 0
    uncertain: int = 0
    committed_unacked: int = 0  # uncertain ops found committed (the kill beat the answer)
    problems: list[str] = field(default_factory=list)
    _offset: int = 0

    def update(self) -> None:
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written is not yet there
        self._offset += end
        for line in data[:end].splitlines():
            self._apply(json.loads(line))

    def _apply(self, e: dict[str, object]) -> None:
        op = e["op"]
        n = int(e.get("n", 0))  # type: ignore[call-overload]
        if op == "session":
            self.sid = int(e["sid"])  # type: ignore[call-overload]
            self.connected = True
        elif op == "alloc?":
            self.pending_alloc[n] = int(e["k"])  # type: ignore[call-overload]
        elif op == "alloc":
            self.pending_alloc.pop(n, None)
            self.acked.update(e["pasids"])  # type: ignore[arg-type]
            self.allocs += 1
        elif op == "refused":
            self.pending_alloc.pop(n, None)
        elif op == "free?":
            lo, hi = int(e["lo"]), int(e["hi"])  # type: ignore[call-overload]
            self.pending_free[n] = {p for p in self.acked if lo <= p <= hi}
        elif op == "free":
            self.acked.difference_update(self.pending_free.pop(n, set()))
            self.frees += 1
        elif op == "resync":
            # The broker's answer after a restart settles every uncertain op: an alloc
            # committed if the set gained PASIDs, a free if its targets are gone.
            now = set(e["pasids"])  # type: ignore[arg-type]
            self.uncertain += len(self.pending_alloc) + len(self.pending_free)
            if self.pending_alloc and now - self.acked:
                self.committed_unacked += 1
            if any(t and not (t & now) for t in self.pending_free.values()):
                self.committed_unacked += 1
            self.pending_alloc.clear()
            self.pending_free.clear()
            self.acked = now
            self.connected = True
        elif op == "fail":
            self.connected = False
        elif op == "mismatch":
            self.problems.append(f"free #{n} freed {e['got']}, expected {e['want']}")
        elif op == "lost":
            self.problems.append("its session could not be resumed (NOT_FOUND)")

    def check(self, held: list[int] | None) -> list[str]:
        """The rules for this worker's set as found (None: no such set)."""
        out = [f"ledger {self.path.name}: {p}" for p in self.problems]
        self.problems.clear()
        if self.sid is None:
            return out
        have = set(held or [])
        if held is None and (self.acked or self.pending_alloc):
            out.append(f"set {self.sid}: gone, but the ledger holds {sorted(self.acked)[:10]}")
        maybe_freed = set().union(*self.pending_free.values()) if self.pending_free else set()
        lost = self.acked - maybe_freed - have
        if lost:
            out.append(f"set {self.sid}: acknowledged PASIDs not held: {sorted(lost)[:10]}")
        extra = have - self.acked - maybe_freed
        if len(extra) > sum(self.pending_alloc.values()):
            out.append(
                f"set {self.sid}: holds {sorted(extra)[:10]} never acknowledged"
                f" ({sum(self.pending_alloc.values())} uncertain)"
            )
        return out


# -- the controller ---------------------------------------------------------------------


@dataclass
class Report:
    kills: int = 0
    worker_kills: int = 0
    acked_allocs: int = 0
    acked_frees: int = 0
    uncertain: int = 0
    committed_unacked: int = 0
    checks: int = 0
    max_held: int = 0
    restart_seconds: list[float] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    def summary(self) -> str:
        rs = sorted(self.restart_seconds) or [0.0]
        return (
            f"crash test: {self.kills} broker kills (SIGKILL), {self.worker_kills} worker kills,"
            f" {self.acked_allocs} acknowledged allocs, {self.acked_frees} acknowledged frees,"
            f" {self.uncertain} in flight at a kill ({self.committed_unacked} of them found"
            f" committed), {self.checks} checks,"
            f" max {self.max_held} PASIDs held, restart to SERVING median"
            f" {rs[len(rs) // 2]:.2f} s max {rs[-1]:.2f} s, {len(self.violations)} violations,"
            f" {self.elapsed:.1f} s"
        )


class Workers:
    def __init__(self, broker: BrokerProcess, grace: int, rng: random.Random) -> None:
        self.broker = broker
        self.grace = grace
        self.rng = rng
        self.gen_file = broker.dir / "generation"
        self.gen = 1
        self.gen_file.write_text("1")
        self.live: dict[int, tuple[subprocess.Popen[bytes], Ledger]] = {}
        self.dead: list[Ledger] = []  # killed on purpose: their sets must go
        self._count = 0

    def spawn(self) -> None:
        self._count += 1
        path = self.broker.dir / f"ledger-{self._count}.jsonl"
        path.touch()
        errlog = (self.broker.dir / f"worker-{self._count}.err").open("ab")
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.crash.crashtest",
                "worker",
                self.broker.address,
                str(path),
                str(self.gen_file),
                str(self.grace),
                str(self.rng.randrange(1 << 30)),
            ],
            cwd=ROOT,
            stderr=errlog,
        )
        errlog.close()
        self.live[p.pid] = (p, Ledger(path))

    def wait_started(self) -> None:
        """Until every live worker has opened or resumed its session.

        (A client that dies after a restart but before resuming is held for the restart
        grace, not its own; the test kills workers only once they are back.)
        """

        def started() -> bool:
            for _, led in self.live.values():
                led.update()
            return all(led.connected for _, led in self.live.values())

        wait_until(started, 30, 0.05, "workers to open or resume their sessions")

    def kill_one(self) -> Ledger:
        pid = self.rng.choice(sorted(self.live))
        p, led = self.live.pop(pid)
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        led.update()
        self.dead.append(led)
        return led

    def release(self) -> None:
        self.gen += 1
        tmp = self.gen_file.with_suffix(".tmp")
        tmp.write_text(str(self.gen))
        tmp.replace(self.gen_file)

    def stop(self) -> None:
        for p, _ in self.live.values():
            p.kill()
            p.wait(10)


def _check(holdings: dict[int, list[int]], workers: Workers, where: str, rep: Report) -> None:
    rep.checks += 1
    seen: dict[int, int] = {}
    for sid, ps in holdings.items():
        for p in ps:
            if p in seen:
                rep.violations.append(f"{where}: PASID {p} in sets {seen[p]} and {sid}")
            seen[p] = sid
    rep.max_held = max(rep.max_held, len(seen))
    for _, led in workers.live.values():
        led.update()
        held = holdings.get(led.sid) if led.sid is not None else None
        rep.violations.extend(f"{where}: {v}" for v in led.check(held))
    for led in workers.dead:
        if led.sid is not None and led.sid in holdings:
            rep.violations.append(f"{where}: set {led.sid} of a killed worker still held")


def _eventually(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    try:
        wait_until(pred, timeout, 0.05)
    except AssertionError:
        return False
    return True


def _db_duplicates(db: str) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        (n,) = con.execute("SELECT count(*) - count(DISTINCT pasid) FROM allocations").fetchone()
        return int(n)
    finally:
        con.close()


def run(
    kills: int,
    workers: int = 4,
    grace: int = 1,
    seed: int | None = None,
    broker_env: dict[str, str] | None = None,
    stop_on_violation: bool = False,
    log: bool = True,
    keep: bool = True,
) -> Report:
    seed = random.randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    rep = Report()
    t0 = time.monotonic()
    b = BrokerProcess("--restart-grace", "30", env=broker_env)
    if log:
        print(f"crash test: seed {seed}, {workers} workers, grace {grace} s, dir {b.dir}")
    ws = Workers(b, grace, rng)
    try:
        b.start()
        for _ in range(workers):
            ws.spawn()
        ws.wait_started()
        for k in range(kills):
            if k % 3 == 1:
                # A worker dies while the broker runs: its set must go after its grace.
                led = ws.kill_one()
                ws.spawn()
                ws.wait_started()
                time.sleep(grace + 0.3)
                if led.sid is not None and not _eventually(
                    lambda sid=led.sid: sid not in db_holdings(b.db)
                ):
                    rep.violations.append(
                        f"kill {k + 1}: set {led.sid} of a killed worker still held"
                        f" {grace + 10} s after its death"
                    )
                rep.worker_kills += 1
            time.sleep(rng.uniform(0.2, 1.2))
            b.kill(signal.SIGKILL)
            rep.kills += 1
            disk = db_holdings(b.db)
            if _db_duplicates(b.db):
                rep.violations.append(f"kill {k + 1}: a PASID twice in allocations")
            _check(disk, ws, f"kill {k + 1} (disk)", rep)
            if k % 3 == 2:
                # A worker dies while the broker is down: its pid is gone at restart, so
                # its set must be reclaimed at once.
                ws.kill_one()
                rep.worker_kills += 1
            t1 = time.monotonic()
            b.start()
            rep.restart_seconds.append(time.monotonic() - t1)
            # The sets of dead pids are reclaimed at start; wait for those commits.
            api = api_holdings(b.address)
            if not _eventually(lambda api=api: db_holdings(b.db) == api):
                rep.violations.append(f"kill {k + 1}: memory {api} != disk {db_holdings(b.db)}")
            _check(api, ws, f"kill {k + 1} (restarted, via API)", rep)
            if log:
                print(
                    f"  kill {k + 1}/{kills}: {sum(len(v) for v in api.values())} PASIDs in"
                    f" {len(api)} sets, {len(rep.violations)} violations",
                    flush=True,
                )
            if rep.violations and stop_on_violation:
                break
            ws.release()
            while len(ws.live) < workers:  # replace those killed while the broker was down
                ws.spawn()
            ws.wait_started()
    finally:
        ws.stop()
        b.stop()
        for led in [led for _, led in ws.live.values()] + ws.dead:
            led.update()
            rep.acked_allocs += led.allocs
            rep.acked_frees += led.frees
            rep.uncertain += led.uncertain
            rep.committed_unacked += led.committed_unacked
        if not (rep.violations and keep):
            b.cleanup()
        elif log:
            print(f"kept {b.dir} for inspection")
    rep.elapsed = time.monotonic() - t0
    if log:
        for v in rep.violations[:20]:
            print("VIOLATION", v)
        print(rep.summary())
    return rep


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        address, ledger, gen_file, grace, seed = argv[1:6]
        worker(address, ledger, gen_file, int(grace), int(seed))
        return 0
    p = argparse.ArgumentParser(prog="crashtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=100)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--grace", type=int, default=1, help="session grace of the workers, s")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--faults",
        default="",
        help="PASID_BROKER_TEST_FAULTS for the broker, e.g. ack_before_commit (must fail)",
    )
    a = p.parse_args(argv)
    env = {"PASID_BROKER_TEST_FAULTS": a.faults} if a.faults else None
    rep = run(a.kills, a.workers, a.grace, a.seed, env)
    return 1 if rep.violations else 0


if __name__ == "__main__":
    sys.exit(main())
