"""Benchmarks: `python -m bench [NAME ...]` (`make bench`); each prints ratios, asserts nothing.

Speed is measured, not asserted by a timer (DEVELOPERS.md): each benchmark prints
figures and their ratios against a baseline measured in the same run.

    python -m bench core      the allocator at 2^20: empty vs 99 %-full, free-all, memory
    python -m bench rpc       alloc RPC rate vs a bare grpc.aio echo on a Unix socket
    python -m bench release   release latency after a client's SIGKILL (target p99 <= 50 ms)
    python -m bench restart   restart to SERVING and RSS with 1 M PASIDs held (<= 5 s, 250 MB)
    python -m bench.metrics_overhead [--rpc]   the cost of the metrics on the alloc path
"""
