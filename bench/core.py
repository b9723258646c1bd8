"""The allocator core at the full 20-bit scale: `make bench-core` (python -m bench core).

Prints, for the pure core (no gRPC, no store, no backend):
- alloc and free, us/op, in an empty space and in a 99 %-full 2^20 space (holes spread at
  random, and holes all at the top, the worst case for the lowest-free search), and the
  full/empty ratios (the target is <= 2x);
- free-all of a set of 1,000 and of 100,000 (destroy, and free [0, 2^32 - 1]);
- free [0, 2^32 - 1] against freeing exactly the owned PASIDs (the width must cost nothing);
- memory per held PASID, by tracemalloc and by RSS, at 1,000,000 held.

Each timing is the median of several repeats. Nothing is asserted: ratios are what to read.
"""

from __future__ import annotations

import gc
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime

from broker.core import Allocator, Quotas

BITS = 20
SIZE = 1 << BITS
TOP = SIZE - 1
U32 = 2**32 - 1
NO_QUOTA = Quotas(0, 0, 0)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return (
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPUs ({cpu});"
        f" Python {platform.python_version()} ({platform.python_implementation()})"
    )


def median_time(run: Callable[[], object], setup: Callable[[], object], repeats: int) -> float:
    """Median seconds of run() over repeats, each after a fresh setup() (not timed)."""
    times = []
    for _ in range(repeats):
        setup()
        gc.collect()
        gc.disable()
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        gc.enable()
    return statistics.median(times)


class Space:
    """A 20-bit allocator with a filler set holding a chosen part of the space."""

    def __init__(self, fill: str, fraction: float, seed: int = 1) -> None:
        self.a = Allocator(BITS, quotas=NO_QUOTA)
        self.a.create_set(1, "filler")
        self.a.create_set(2, "bench")
        n = int(TOP * fraction)
        if fill == "random":
            held = random.Random(seed).sample(range(1, SIZE), n)
        else:  # dense: everything from 1 up, the holes all at the top
            held = list(range(1, n + 1))
        self.a.claim(1, held)
        self.free_count = TOP - n


def alloc_free(space: Space, ops: int, repeats: int) -> tuple[float, float]:
    """us/op of alloc(1 PASID, lowest in [1, 2^20 - 1]) and of free_range(p, p)."""
    a = space.a
    got: list[int] = []

    def allocs() -> None:
        for _ in range(ops):
            got.extend(a.alloc(2, 1, TOP))

    def frees() -> None:
        for p in got:
            a.free_range(2, p, p)

    def clear() -> None:
        if got:
            a.free_range(2, 0, U32)
            got.clear()

    def refill() -> None:
        clear()
        allocs()

    t_alloc = median_time(allocs, clear, repeats)
    t_free = median_time(frees, refill, repeats)
    clear()
    return t_alloc / ops * 1e6, t_free / ops * 1e6


def free_all(n: int, repeats: int) -> tuple[float, float]:
    """Seconds to destroy a set of n, and to free [0, 2^32 - 1] of it (a 2nd set holds n)."""
    a = Allocator(BITS, quotas=NO_QUOTA)
    a.create_set(9, "other")
    a.claim(9, range(1, SIZE, 2)[:n])  # interleaved with the set under test

    def fill() -> None:
        if 1 in a.sets:
            a.destroy_set(1)
        a.create_set(1, "bench")
        a.alloc(1, 1, TOP, count=n)

    t_destroy = median_time(lambda: a.destroy_set(1), fill, repeats)
    t_free = median_time(lambda: a.free_range(1, 0, U32), fill, repeats)
    return t_destroy, t_free


def wide_free(ops: int) -> tuple[float, float, float]:
    """us for free [0, 2^32 - 1] and for free [first, last] of a set owning 10 PASIDs in a
    99 %-full space, and for free [0, 2^32 - 1] by a set owning nothing (medians of ops)."""
    a = Space("random", 0.99).a
    a.create_set(3, "empty")
    wide: list[float] = []
    exact: list[float] = []
    none: list[float] = []
    clock = time.perf_counter
    for i in range(ops):
        held = a.alloc(2, 1, TOP, count=10)
        lo, hi = (0, U32) if i % 2 else (held[0], held[-1])
        t0 = clock()
        a.free_range(2, lo, hi)
        t1 = clock()
        a.free_range(3, 0, U32)
        t2 = clock()
        (wide if i % 2 else exact).append(t1 - t0)
        none.append(t2 - t1)
    w, e, n = (statistics.median(x) * 1e6 for x in (wide, exact, none))
    return w, e, n


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hold(held: int) -> Allocator:
    a = Allocator(BITS, quotas=Quotas(per_set=1000))
    for s in range(held // 1000):
        a.create_set(s, f"vm{s}")
        a.alloc(s, 1, TOP, count=1000)
    return a


def memory_child(held: int, how: str) -> None:
    """In a fresh interpreter: bytes used by `held` PASIDs in sets of 1,000, printed."""
    gc.collect()
    if how == "tracemalloc":
        tracemalloc.start()
        a = _hold(held)
        used = tracemalloc.get_traced_memory()[0]
    else:
        rss0 = rss_bytes()
        a = _hold(held)
        gc.collect()
        used = rss_bytes() - rss0
    assert a.in_use == held
    print(used)


def memory_per_pasid(held: int) -> tuple[float, float]:
    """Bytes per held PASID, each measured in its own fresh process: (tracemalloc, RSS)."""
    out = []
    for how in ("tracemalloc", "rss"):
        code = f"from bench.core import memory_child; memory_child({held}, {how!r})"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        out.append(int(r.stdout) / held)
    return out[0], out[1]


def main(quick: bool = False) -> int:
    ops = 2000 if quick else 10_000
    repeats = 3 if quick else 7
    print(f"pasid-broker core benchmark, {BITS}-bit namespace ({SIZE} PASIDs)")
    print(f"machine: {machine()}")
    print()

    empty = Space("random", 0.0)
    rand = Space("random", 0.99)
    dense = Space("dense", 0.99)
    a_e, f_e = alloc_free(empty, ops, repeats)
    a_r, f_r = alloc_free(rand, min(ops, rand.free_count), repeats)
    a_d, f_d = alloc_free(dense, min(ops, dense.free_count), repeats)
    print(f"alloc/free of one PASID, lowest free in [1, 2^20 - 1], {ops} ops, us/op:")
    print(f"  {'space':<34}{'alloc':>9}{'free':>9}{'alloc x':>10}{'free x':>9}")
    rows = [
        ("empty", a_e, f_e),
        ("99 % full, holes at random", a_r, f_r),
        ("99 % full, holes all at the top", a_d, f_d),
    ]
    for name, al, fr in rows:
        print(f"  {name:<34}{al:9.2f}{fr:9.2f}{al / a_e:10.2f}{fr / f_e:9.2f}")
    worst = max(a_r / a_e, a_d / a_e, f_r / f_e, f_d / f_e)
    print(f"  worst full/empty ratio: {worst:.2f}x (target <= 2x)")
    print()

    sizes = (1_000, 10_000) if quick else (1_000, 100_000)
    print("free-all of one set (another set's PASIDs interleaved with it):")
    per: list[float] = []
    for n in sizes:
        t_d, t_f = free_all(n, repeats)
        per.append(t_d / n)
        print(
            f"  {n:>7} held: destroy {t_d * 1e3:8.2f} ms ({t_d / n * 1e6:.2f} us/PASID),"
            f" free [0, 2^32 - 1] {t_f * 1e3:8.2f} ms ({t_f / n * 1e6:.2f} us/PASID)"
        )
    print(f"  per-PASID cost, {sizes[1]} vs {sizes[0]}: {per[1] / per[0]:.2f}x (linear = 1x)")
    print()

    t_wide, t_exact, t_none = wide_free(ops)
    print("free [0, 2^32 - 1] vs the owned count (a set owning 10, in a 99 %-full space):")
    print(f"  free [first owned, last owned]  {t_exact:8.2f} us")
    print(f"  free [0, 2^32 - 1]              {t_wide:8.2f} us  ({t_wide / t_exact:.2f}x)")
    print(f"  free [0, 2^32 - 1], owning none {t_none:8.2f} us")
    print()

    held = 100_000 if quick else 1_000_000
    traced, rss = memory_per_pasid(held)
    print(f"memory at {held} PASIDs held in sets of 1,000 (bitmap + sorted sets + counters):")
    print(f"  tracemalloc {traced:6.1f} bytes/PASID ({traced * held / 2**20:.1f} MiB)")
    print(f"  RSS delta   {rss:6.1f} bytes/PASID ({rss * held / 2**20:.1f} MiB)")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(quick="--quick" in sys.argv))
