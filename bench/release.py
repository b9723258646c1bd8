"""Release latency after client death, on a Unix socket (target: p99 <= 50 ms).

CLIENTS client processes (30) each open a session through the client library (so the
broker holds each one's pidfd from the peer handshake), allocate, and are SIGKILLed at
the same instant: one kill(2) of their process group. Each set's release latency runs
from that kill to the moment a Watch receives its set_reclaimed/set_destroyed event (the
set is then freed in the allocator and the backend, and durable). The baseline is the
same path for an ordinary alloc: from sending it to seeing its event on the Watch, i.e.
what the measuring method itself costs.

Beside it, two figures that do not depend on this process being scheduled: each event's
ts_unix is the broker's own clock as it began the transaction that made the destroy
durable, so kill -> ts_unix is the release as the broker did it (the Watch's delivery and
this bench's reader thread, which compete for the same two CPUs with 30 dying processes,
come on top of that); and per set, its holder's exit (this bench's own pidfd of it) ->
that commit is the broker's share. The exit times come from a Python thread here and can
be late by a few ms, so that share can read negative.
"""

from __future__ import annotations

import json
import os
import select
import signal
import statistics
import subprocess
import sys
import threading
import time

from pasid_client import Client

from tests.harness import ROOT, BrokerProcess

CLIENTS = 30
HOLDER = """
import json, sys, time
from pasid_client import Client
with Client(sys.argv[1]) as c, c.session("victim") as s:
    s.alloc(1, 100000, count=int(sys.argv[2]))
    print(json.dumps({"set": s.session_id, "verified": s.verified}), flush=True)
    time.sleep(3600)
"""


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def wait_seen(cond: threading.Condition, seen: dict[int, float], key: int) -> float:
    with cond:
        if not cond.wait_for(lambda: key in seen, 10):
            raise RuntimeError(f"no event for {key} within 10 s")
        return seen[key]


def exits_after(pidfds: list[int], t0_box: list[float], out: dict[int, float]) -> threading.Thread:
    """A thread that records when each pidfd polls readable (its process has exited),
    relative to t0_box[0], by its index in pidfds: the kernel's part of the release,
    measured beside it."""

    def run() -> None:
        ep = select.epoll()
        index = {fd: i for i, fd in enumerate(pidfds)}
        for fd in pidfds:
            ep.register(fd, select.EPOLLIN)
        left = len(pidfds)
        while left:
            for fd, _ in ep.poll(10):
                out[index[fd]] = time.perf_counter() - t0_box[0]
                ep.unregister(fd)
                os.close(fd)
                left -= 1
        ep.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def spawn_group(address: str, held: int) -> tuple[int, list[int], list[int]]:
    """CLIENTS holders in one new process group; (pgid, their set ids, pidfds of them)
    once all hold."""
    procs: list[subprocess.Popen[str]] = []
    for i in range(CLIENTS):
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", HOLDER, address, str(held)],
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
                process_group=0 if i == 0 else procs[0].pid,
            )
        )
    sets = []
    for p in procs:
        assert p.stdout is not None
        ans = json.loads(p.stdout.readline())
        if not ans["verified"]:
            raise RuntimeError("holder is not kernel-verified: no peer socket?")
        sets.append(ans["set"])
    return procs[0].pid, sets, [os.pidfd_open(p.pid) for p in procs]


def main(quick: bool = False, held: int = 100) -> int:
    rounds = 1 if quick else int(os.environ.get("BENCH_RELEASE_ROUNDS", "4"))
    b = BrokerProcess("--quota-per-set", "0")
    b.start()
    seen: dict[int, float] = {}
    # key -> (the event's ts_unix, its kind): the broker's own clock, taken as it began
    # the transaction that made the destroy durable.
    committed: dict[int, tuple[float, str]] = {}
    cond = threading.Condition()
    try:
        with Client(b.address) as c, Client(b.admin_address) as a:
            stream = a.watch(0)  # every set's events: the admin socket

            def follow() -> None:
                for ev in stream:
                    # A killed client's set ends by whichever the broker notices first:
                    # its process's pidfd (set_reclaimed) or its stream (set_destroyed).
                    if ev.kind in ("set_destroyed", "set_reclaimed", "alloc"):
                        key = ev.revision if ev.kind == "alloc" else -ev.set_id
                        with cond:
                            seen.setdefault(key, time.perf_counter())
                            committed.setdefault(key, (ev.ts_unix, ev.kind))
                            cond.notify_all()

            threading.Thread(target=follow, daemon=True).start()
            release: list[float] = []
            commit: list[float] = []  # kill -> the broker commits the destroy (its clock)
            kinds: dict[str, int] = {}
            gap: list[float] = []  # per set: its holder's exit -> the broker's commit
            exits: list[float] = []  # kill -> the process has exited (kernel only)
            baseline: list[float] = []
            with c.session("probe") as probe:
                for _ in range(rounds):
                    pgid, sets, pidfds = spawn_group(b.address, held)
                    time.sleep(0.2)  # let the holders settle into their sleep
                    t0_box = [0.0]
                    exited: dict[int, float] = {}
                    watcher = exits_after(pidfds, t0_box, exited)
                    t0w = time.time()
                    t0 = t0_box[0] = time.perf_counter()
                    os.killpg(pgid, signal.SIGKILL)  # all of them at the same instant
                    release.extend(wait_seen(cond, seen, -s) - t0 for s in sets)
                    for s in sets:
                        ts, kind = committed[-s]
                        commit.append(ts - t0w)
                        kinds[kind] = kinds.get(kind, 0) + 1
                    watcher.join(10)
                    exits.extend(exited.values())
                    # per set: its holder's exit (seen here) -> the broker's commit
                    gap.extend(commit[-CLIENTS + i] - exited[i] for i in range(CLIENTS))
                    for _ in range(CLIENTS):  # reap
                        try:
                            os.waitpid(-pgid, 0)
                        except ChildProcessError:
                            break
                    for _ in range(5):  # baseline: an alloc's own event through the Watch
                        rev = c.info().revision + 1
                        t0 = time.perf_counter()
                        got = probe.alloc(1, 100000)
                        baseline.append(wait_seen(cond, seen, rev) - t0)
                        probe.free(got[0], got[0])
            stream.close()
        ms = [x * 1000 for x in release]
        ex = [x * 1000 for x in exits]
        base = [x * 1000 for x in baseline]
        cm = [x * 1000 for x in commit]
        gp = [x * 1000 for x in gap]
        print(
            f"release after SIGKILL of {CLIENTS} clients at once, {rounds} round(s), "
            f"{held} PASIDs each, kernel-verified holders (Unix socket)"
        )
        print(
            f"  p50 {pct(ms, 50):6.2f} ms   p90 {pct(ms, 90):6.2f} ms   p99 {pct(ms, 99):6.2f} ms"
            f"   max {max(ms):6.2f} ms   ({len(ms)} sets)"
        )
        print(
            f"  of which the kernel (kill -> exit, pidfd readable): p50 {pct(ex, 50):6.2f} ms"
            f"   p99 {pct(ex, 99):6.2f} ms   max {max(ex):6.2f} ms"
        )
        print(
            f"  kill -> the broker's commit of the destroy (event ts_unix):"
            f" p50 {pct(cm, 50):6.2f} ms   p99 {pct(cm, 99):6.2f} ms   max {max(cm):6.2f} ms"
            f"   ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})"
        )
        print(
            f"  per set, its holder's exit -> that commit (the broker's share):"
            f" p50 {pct(gp, 50):6.2f} ms   p99 {pct(gp, 99):6.2f} ms   max {max(gp):6.2f} ms"
        )
        print(
            f"  baseline (alloc -> its event): p50 {pct(base, 50):.2f} ms,"
            f" p99 {pct(base, 99):.2f} ms"
        )
        print(
            f"  p99 / target 50 ms: at the Watch {pct(ms, 99) / 50:.2f},"
            f" at the broker's commit {pct(cm, 99) / 50:.2f}   "
            f"p50 release / p50 baseline = {statistics.median(ms) / statistics.median(base):.1f}x"
        )
    finally:
        b.cleanup()
    return 0


if __name__ == "__main__":
    main()
