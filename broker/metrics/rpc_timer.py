"""RpcTimer: the server interceptor that times unary RPCs (py-grpc-prometheus's way: the
servicer is not asked to call anything)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import grpc

from broker.metrics.labels import UNARY_RPCS
from broker.service.interceptors import PerMethodWrapper, rebuild

if TYPE_CHECKING:
    from broker.metrics.registry import Metrics


class RpcTimer(PerMethodWrapper):
    """Times each unary pasid.v1 RPC named in UNARY_RPCS, from the handler's start to its
    reply being ready (aborted calls too). Streams are not timed here: the Session
    stream's operations are timed one by one (Metrics.session_op_done).

    Wrapped handlers are built once per method and reused: no per-call `.labels()` or
    handler construction on the hot path.
    """

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        service, _, rpc = method.lstrip("/").rpartition("/")
        if (
            handler is None
            or not service.startswith("pasid.v1.")
            or rpc not in UNARY_RPCS
            or handler.unary_unary is None
        ):
            return handler
        inner = handler.unary_unary
        observe = self._metrics.unary(rpc).observe

        async def timed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            t0 = time.perf_counter()
            try:
                return await inner(request, context)
            finally:
                observe(time.perf_counter() - t0)

        return rebuild(handler, timed)
