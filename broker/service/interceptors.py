"""What the broker's grpc.aio server interceptors share: a handler rebuilt with a new
behaviour or decoder, built once per method where it depends on nothing else.

Each interceptor keeps its own reason for wrapping (authz.py, wire.py,
broker/metrics/rpc_timer.py); this is only the mechanism, so that the four arities and
the per-method cache are written once. It imports nothing of the broker, so the metrics
may use it without the engine.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

# What a handler of any arity runs: (request or request iterator, context) -> reply or
# reply iterator.
Behaviour = Callable[..., Any]


def behaviour(handler: grpc.RpcMethodHandler) -> Behaviour:
    """What the handler runs, whichever of the four arities it is."""
    return (  # type: ignore[no-any-return]
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )


def rebuild(
    handler: grpc.RpcMethodHandler,
    new_behaviour: Behaviour | None = None,
    *,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """The same RPC (arity, serializers), running `new_behaviour` and decoding with
    `request_deserializer` where given."""
    run = new_behaviour or behaviour(handler)
    ser: dict[str, Any] = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming:
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(run, **ser)
        return grpc.stream_unary_rpc_method_handler(run, **ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(run, **ser)
    return grpc.unary_unary_rpc_method_handler(run, **ser)


class PerMethodWrapper(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """An interceptor whose wrapped handler depends only on the method: `wrap` runs once
    per method (again only if the server hands out another handler for it), so the hot
    path gains no per-call handler construction."""

    def __init__(self) -> None:
        # method -> (the handler it was built from, the handler built)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler to serve `method` with (`handler` itself, or None, to leave it)."""
        raise NotImplementedError
