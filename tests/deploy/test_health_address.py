"""--health-address serves grpc.health.v1 alone on TCP (Kubernetes grpc probes), and
nothing else: the PASID API stays on the Unix socket."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc

from tests.harness import ROOT, BrokerProcess


def test_health_alone_on_tcp(make_broker: Callable[..., BrokerProcess]) -> None:
    b = make_broker("--health-address", "127.0.0.1:0")
    (line,) = [json.loads(x) for x in b.read_log().splitlines() if '"health_address"' in x]
    address = line["health_address"]
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")
    with grpc.insecure_channel(address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.PasidBrokerStub(ch).GetInfo(pb.GetInfoRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    # The operator's command says the same over the Unix socket, and 1 once it is gone.
    health = [sys.executable, "-m", "broker", "health", "--socket", b.socket]
    up = subprocess.run(health, capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert up.returncode == 0 and "SERVING" in up.stdout, up.stderr
    assert b.stop() == 0
    down = subprocess.run(health, capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert down.returncode == 1 and "UNAVAILABLE" in down.stdout
