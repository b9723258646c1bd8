"""Restart with 1 M PASIDs held: time from exec to the first answered RPC, and memory.

Targets: the first RPC answered <= 2 s after exec with 1 M PASIDs held (issue 12; the
first target was 5 s to SERVING); <= 250 MB RSS at 1 M held. A database with HELD PASIDs
in SETS sets (whose verified holder, pid plus start time, is alive, so recovery checks
and watches each one and keeps them) is written through the store, then a real broker
process is started on it and a GetInfo is sent every 5 ms from exec until one is
answered (UNAVAILABLE while it recovers); its VmRSS is read from /proc. The baselines,
in the same run: the same start on an empty database, and the daemon's imports alone
(`python -c "import broker.__main__"`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import grpc
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc

from broker.peer import credentials
from broker.store import AddPasids, CreateSet, SetRow, SqliteStore
from tests.harness import ROOT, BrokerProcess

TARGET_S = 2.0


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


def start_to_first_rpc(b: BrokerProcess) -> tuple[float, float]:
    """Seconds from exec until a GetInfo is answered, and the daemon's VmRSS then."""
    t0 = time.perf_counter()
    b.start(wait=False)
    assert b.proc is not None
    # Reconnect within 5-20 ms: grpc's default backoff after the first refused connect
    # (the socket is not there yet) is a second, which would be timed as the broker's.
    backoff = [
        ("grpc.initial_reconnect_backoff_ms", 5),
        ("grpc.min_reconnect_backoff_ms", 5),
        ("grpc.max_reconnect_backoff_ms", 20),
    ]
    with grpc.insecure_channel(b.address, options=backoff) as ch:
        stub = pb_grpc.PasidBrokerStub(ch)
        while True:
            try:
                stub.GetInfo(pb.GetInfoRequest(), timeout=1.0)
                break
            except grpc.RpcError:
                if b.proc.poll() is not None:
                    raise AssertionError(f"broker exited:\n{b.read_log()}") from None
                if time.perf_counter() - t0 > 60:
                    raise AssertionError("no answer within 60 s") from None
                time.sleep(0.005)
    took = time.perf_counter() - t0
    return took, rss_mb(b.proc.pid)


def import_seconds() -> float:
    """The daemon's imports alone, in a fresh interpreter (best of 3)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import broker.__main__"], check=True, cwd=ROOT)
        best = min(best, time.perf_counter() - t0)
    return best


# A broker that holds many PASIDs in a few sets whose holder lives: no per-set quota, a
# restart grace beyond the run, quiet.
BROKER_ARGS = (
    *("--quota-per-set", "0", "--restart-grace", "600"),
    *("--metrics-address", "off", "--log-level", "WARNING"),
)


def main(quick: bool = False) -> int:
    held = 100_000 if quick else int(os.environ.get("BENCH_RESTART_HELD", "1000000"))
    sets = 100 if quick else 1000
    keeper = subprocess.Popen(["sleep", "3600"])  # the sets' holder: alive
    empty, full = BrokerProcess(*BROKER_ARGS), BrokerProcess(*BROKER_ARGS)
    try:
        t_fill = time.perf_counter()
        fill(full.db, held, sets, keeper.pid)
        t_fill = time.perf_counter() - t_fill
        imports = import_seconds()
        start_to_first_rpc(empty)  # creates the database (a migration: not a restart)
        empty.stop()
        base_t, base_rss = start_to_first_rpc(empty)
        t, rss = start_to_first_rpc(full)
        from pasid_client import Client

        with Client(full.address) as c:
            in_use = c.info().in_use
        print(
            f"restart with {in_use:,} PASIDs held in {sets} sets "
            f"(database written in {t_fill:.1f} s)"
        )
        print(
            f"  exec -> first RPC: {t:5.2f} s   (empty database: {base_t:.2f} s;"
            f" imports alone: {imports:.2f} s)   target <= {TARGET_S:g} s:"
            f" {t / TARGET_S:.2f} of it"
        )
        print(
            f"  VmRSS:             {rss:6.1f} MB (empty database: {base_rss:.1f} MB;"
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
