"""Release latency after a client's death, on a Unix socket (target: p99 <= 50 ms).

A client process opens a session, allocates, and is SIGKILLed; the time from the kill to
the moment a Watch receives the set's set_destroyed event is the release latency (the
set is then freed in the allocator and the backend, and durable). The baseline is the
same path for an ordinary alloc: from sending it to seeing its event on the Watch, i.e.
what the measuring method itself costs.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

from pasid_client import Client

from tests.harness import ROOT, BrokerProcess

HOLDER = """
import json, sys, time
from pasid_client import Client
with Client(sys.argv[1]) as c, c.session("victim") as s:
    s.alloc(1, 100000, count=int(sys.argv[2]))
    print(json.dumps({"set": s.session_id}), flush=True)
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


def main(quick: bool = False, held: int = 100) -> int:
    rounds = 5 if quick else int(os.environ.get("BENCH_RELEASE_ROUNDS", "40"))
    b = BrokerProcess("--quota-per-set", "0")
    b.start()
    seen: dict[int, float] = {}
    cond = threading.Condition()
    try:
        with Client(b.address) as c:
            stream = c.watch(0)

            def follow() -> None:
                for ev in stream:
                    # A killed client's set ends by whichever the broker notices first:
                    # its stream (set_destroyed) or its process's pidfd (set_reclaimed).
                    if ev.kind in ("set_destroyed", "set_reclaimed", "alloc"):
                        key = ev.revision if ev.kind == "alloc" else -ev.set_id
                        with cond:
                            seen.setdefault(key, time.perf_counter())
                            cond.notify_all()

            threading.Thread(target=follow, daemon=True).start()
            release: list[float] = []
            baseline: list[float] = []
            with c.session("probe") as probe:
                for _ in range(rounds):
                    p = subprocess.Popen(
                        [sys.executable, "-c", HOLDER, b.address, str(held)],
                        stdout=subprocess.PIPE,
                        text=True,
                        cwd=ROOT,
                    )
                    assert p.stdout is not None
                    set_id = json.loads(p.stdout.readline())["set"]
                    time.sleep(0.02)
                    t0 = time.perf_counter()
                    p.send_signal(signal.SIGKILL)
                    release.append(wait_seen(cond, seen, -set_id) - t0)
                    p.wait()
                    # baseline: an alloc's own event through the same Watch
                    rev = c.info().revision + 1
                    t0 = time.perf_counter()
                    got = probe.alloc(1, 100000)
                    baseline.append(wait_seen(cond, seen, rev) - t0)
                    probe.free(got[0], got[0])
            stream.close()
        ms = [x * 1000 for x in release]
        base = [x * 1000 for x in baseline]
        print(f"release after SIGKILL, {rounds} clients holding {held} PASIDs each (Unix socket)")
        print(
            f"  p50 {pct(ms, 50):6.2f} ms   p90 {pct(ms, 90):6.2f} ms   p99 {pct(ms, 99):6.2f} ms"
            f"   max {max(ms):6.2f} ms"
        )
        print(
            f"  baseline (alloc -> its event): p50 {pct(base, 50):.2f} ms,"
            f" p99 {pct(base, 99):.2f} ms"
        )
        print(
            f"  p99 / target 50 ms = {pct(ms, 99) / 50:.2f}   "
            f"p50 release / p50 baseline = {statistics.median(ms) / statistics.median(base):.1f}x"
        )
    finally:
        b.cleanup()
    return 0


if __name__ == "__main__":
    main()
