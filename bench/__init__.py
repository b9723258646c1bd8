"""Benchmarks: each prints figures as ratios against a baseline measured in the same run.

    python -m bench rpc       alloc RPC rate vs a bare grpc.aio echo on a Unix socket
    python -m bench release   release latency after a client's SIGKILL (target p99 <= 50 ms)

Nothing here asserts a time; tests never depend on these numbers.
"""
