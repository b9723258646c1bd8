"""Bare grpc echo servers on a Unix socket: the baselines for bench.rpc.

`python -m bench.echo_server PATH` serves grpc.aio (the broker's server model);
`--sync` serves the thread-pool server instead, for the sync-vs-aio figure. Same
transport options as the broker, generic handlers with bytes in and out (no protobuf),
so what each measures is grpc itself.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

SYNC_WORKERS = 32  # more than the bench's 16 streams + 16 unary callers at once


async def unary(request: bytes, context: Any) -> bytes:
    return request


async def stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for r in requests:
        yield r


def sync_unary(request: bytes, context: Any) -> bytes:
    return request


def sync_stream(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
    yield from requests


def handler(u: Any, s: Any) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(u),
            "Stream": grpc.stream_stream_rpc_method_handler(s),
        },
    )


async def serve(path: str) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler(unary, stream),))
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def serve_sync(path: str) -> None:
    server = grpc.server(ThreadPoolExecutor(SYNC_WORKERS), options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler(sync_unary, sync_stream),))
    server.add_insecure_port(f"unix:{path}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    if "--sync" in sys.argv[1:]:
        serve_sync(sys.argv[1])
    else:
        asyncio.run(serve(sys.argv[1]))
