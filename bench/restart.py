"""Restart with 1 M PASIDs held: time to SERVING and resident memory.

Targets: serving again <= 5 s after a restart with 1 M PASIDs held; <= 250 MB RSS at 1 M
held. A database with HELD PASIDs in SETS sets (whose verified holder, pid plus start
time, is alive, so recovery checks and watches each one and keeps them) is written
through the store, then a real broker process is started on it and timed from exec to
health SERVING; its VmRSS is read from /proc. The baseline is the same start on an empty
database, in the same run.
"""

from __future__ import annotations

import os
import subprocess
import time

from broker.peer import credentials
from broker.store import AddPasids, CreateSet, SetRow, SqliteStore
from tests.harness import BrokerProcess


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fill(db: str, held: int, sets: int, pid: int) -> None:
    st = SqliteStore(db)
    st.open()
    per = held // sets
    started = credentials.start_time(pid)
    for i in range(sets):
        lo = 1 + i * per
        st.commit(
            [
                CreateSet(SetRow(i + 1, f"vm{i}", pid, 0, 60, f"{i:064x}", 0.0, started, 0, pid)),
                AddPasids(i + 1, tuple(range(lo, lo + per))),
            ]
        )
    st.close()


def start_to_serving(b: BrokerProcess) -> tuple[float, float]:
    t0 = time.perf_counter()
    b.start()
    took = time.perf_counter() - t0
    assert b.proc is not None
    return took, rss_mb(b.proc.pid)


def main(quick: bool = False) -> int:
    held = 100_000 if quick else int(os.environ.get("BENCH_RESTART_HELD", "1000000"))
    sets = 100 if quick else 1000
    keeper = subprocess.Popen(["sleep", "3600"])  # the sets' holder: alive
    args = (
        "--quota-per-set",
        "0",
        "--restart-grace",
        "600",
        "--metrics-address",
        "off",
        "--log-level",
        "WARNING",
    )
    empty, full = BrokerProcess(*args), BrokerProcess(*args)
    try:
        t_fill = time.perf_counter()
        fill(full.db, held, sets, keeper.pid)
        t_fill = time.perf_counter() - t_fill
        base_t, base_rss = start_to_serving(empty)
        t, rss = start_to_serving(full)
        from pasid_client import Client

        with Client(full.address) as c:
            in_use = c.info().in_use
        print(
            f"restart with {in_use:,} PASIDs held in {sets} sets "
            f"(database written in {t_fill:.1f} s)"
        )
        print(
            f"  exec -> SERVING: {t:6.2f} s   (empty database: {base_t:.2f} s;"
            f" ratio {t / base_t:.1f}x)   target <= 5 s: {t / 5:.2f} of it"
        )
        print(
            f"  VmRSS:           {rss:6.1f} MB (empty database: {base_rss:.1f} MB;"
            f" {(rss - base_rss) * 2**20 / max(in_use, 1):.0f} B per held PASID)"
            f"   target <= 250 MB: {rss / 250:.2f} of it"
        )
    finally:
        empty.cleanup()
        full.cleanup()
        keeper.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
