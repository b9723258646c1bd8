"""The broker's services reach grpc.aio as generic handlers only (endpoints.GenericOnly):
grpc.aio waits on one request-call future per registered method for every call it
accepts, so registering methods made each unary call pay for all of them."""

from __future__ import annotations

from typing import Any

from pasid.v1 import broker_pb2_grpc as pb_grpc

from broker.service.endpoints import GenericOnly


class Recorder:
    def __init__(self) -> None:
        self.generic: list[Any] = []
        self.registered: list[str] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        self.registered.append(service)


def test_services_are_added_as_generic_handlers_only() -> None:
    server = Recorder()
    pb_grpc.add_PasidBrokerServicer_to_server(pb_grpc.PasidBrokerServicer(), GenericOnly(server))  # type: ignore[arg-type]
    assert server.registered == []
    assert len(server.generic) == 1
    assert server.generic[0].service_name() == "pasid.v1.PasidBroker"
