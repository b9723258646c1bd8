"""Recovery's peak memory per held PASID and per set: the sizing table's source.

Issue 22: under an 80 MB cgroup limit the broker was OOM-killed at 540 k PASIDs, then
again in every recovery, and systemd restarted it in a loop. A limit must follow from
what the broker will hold, so this measures it. Databases of three shapes are written
through the store (every set's verified holder alive, so recovery keeps and watches each
one, with a pidfd); a real broker process starts on each, and once its first GetInfo is
answered its VmHWM (the peak resident set of the whole start: imports, load, replay,
sessions) and VmRSS are read from /proc. The shapes separate the two costs:

  base: an empty database; A: PASIDS_A in SETS_A sets; B: PASIDS_B in SETS_B sets

  peak(A) - base = a * PASIDS_A + b * SETS_A;  peak(B) - base = a * PASIDS_B + b * SETS_B

solved for a (bytes per held PASID) and b (bytes per set). docs/sizing.md turns them
into MemoryMax and the DaemonSet's limit.
"""

from __future__ import annotations

import os
import subprocess

from bench.restart import BROKER_ARGS, fill, start_to_first_rpc
from tests.harness import BrokerProcess

PASIDS_A, SETS_A = 1_000_000, 1_000
PASIDS_B, SETS_B = 100_000, 10_000


def status_mb(pid: int) -> dict[str, float]:
    """VmHWM and VmRSS of a live process, in MB."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(rest.split()[0]) / 1024
    return out


def peak(held: int, sets: int, holder: int, args: tuple[str, ...]) -> tuple[float, float, float]:
    """(VmHWM MB, VmRSS MB, seconds to the first RPC) of a start on such a database."""
    b = BrokerProcess(*args)
    try:
        if held:
            fill(b.db, held, sets, holder)
        else:  # the empty database: created by one start, measured at the second
            start_to_first_rpc(b)
            b.stop()
        took, _ = start_to_first_rpc(b)
        assert b.proc is not None
        mem = status_mb(b.proc.pid)
        return mem["VmHWM"], mem["VmRSS"], took
    finally:
        b.cleanup()


def main(quick: bool = False) -> int:
    scale = 10 if quick else 1
    a_held, a_sets = PASIDS_A // scale, SETS_A // scale
    b_held, b_sets = PASIDS_B // scale, SETS_B // scale
    holder = subprocess.Popen(["sleep", "3600"])  # every set's holder: alive
    args = BROKER_ARGS
    try:
        base, base_rss, _ = peak(0, 0, holder.pid, args)
        pa, ra, ta = peak(a_held, a_sets, holder.pid, args)
        pb, rb, tb = peak(b_held, b_sets, holder.pid, args)
    finally:
        holder.kill()
    mb = 2**20
    da, db = (pa - base) * mb, (pb - base) * mb
    # Two equations, two unknowns (Cramer's rule).
    det = a_held * b_sets - a_sets * b_held
    per_pasid = (da * b_sets - db * a_sets) / det
    per_set = (a_held * db - b_held * da) / det
    load = os.getloadavg()[0]
    print(f"recovery's peak memory (VmHWM at the first answered RPC), load {load:.1f}")
    print(f"  empty database:                       peak {base:6.1f} MB, RSS {base_rss:6.1f} MB")
    print(
        f"  {a_held:>9,} PASIDs in {a_sets:>6,} sets:    peak {pa:6.1f} MB, RSS {ra:6.1f} MB"
        f" ({ta:.2f} s to the first RPC)"
    )
    print(
        f"  {b_held:>9,} PASIDs in {b_sets:>6,} sets:    peak {pb:6.1f} MB, RSS {rb:6.1f} MB"
        f" ({tb:.2f} s to the first RPC)"
    )
    print(f"  per held PASID: {per_pasid:.0f} B; per set (session): {per_set / 1024:.1f} KiB")
    for held, sets in ((100_000, 100), (1_000_000, 1_000), (4_000_000, 10_000)):
        need = base + (per_pasid * held + per_set * sets) / mb
        print(f"  sizing: {held:>9,} PASIDs, {sets:>6,} sets -> peak {need:6.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
