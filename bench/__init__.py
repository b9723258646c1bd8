"""Benchmarks: `python -m bench [NAME ...]` (`make bench`); each prints ratios, asserts nothing.

Speed is measured, not asserted by a timer (DEVELOPERS.md): each benchmark prints
figures and their ratios against a baseline measured in the same run.

    python -m bench core      the allocator at 2^20: empty vs 99 %-full, free-all, memory
    python -m bench rpc       alloc RPC rate, p50 and CPU vs a bare grpc.aio echo on a Unix
                              socket (stream and unary >= 0.85x, p50 <= 1.3x, batched
                              >= 100,000 PASIDs/s)
    python -m bench release   release latency after 30 clients' SIGKILL (target p99 <= 50 ms)
    python -m bench restart   exec to first RPC and RSS with 1 M PASIDs held (<= 2 s, 250 MB)
    python -m bench watch     another tenant's alloc p99 while 512 watchers follow a churning
                              set, over its p99 without them (<= 5x)
    python -m bench profile   where a stream alloc's server CPU goes, by perf (make profile;
                              only when named: not part of `make bench`)
    python -m bench.metrics_overhead [--rpc]   the cost of the metrics on the alloc path
"""
