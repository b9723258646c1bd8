from __future__ import annotations

from collections.abc import Iterator

import pytest
from pasid_client import Client

from tests.harness import BrokerProcess


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> Iterator[BrokerProcess]:
    """A running broker on the simulator (20 bits, set quota 1000), with the flags of the
    test's `broker_args` marker (`pytestmark = pytest.mark.broker_args(...)` for a
    module)."""
    mark = request.node.get_closest_marker("broker_args")
    b = BrokerProcess(*(mark.args if mark is not None else ()))
    b.start()
    yield b
    b.cleanup()


@pytest.fixture
def make_broker() -> Iterator[object]:
    """A factory for brokers with extra flags; all are cleaned up."""
    made: list[BrokerProcess] = []

    def make(*args: str, start: bool = True) -> BrokerProcess:
        b = BrokerProcess(*args)
        made.append(b)
        return b.start() if start else b

    yield make
    for b in made:
        b.cleanup()


@pytest.fixture
def client(broker: BrokerProcess) -> Iterator[Client]:
    with Client(broker.address) as c:
        yield c


@pytest.fixture
def admin(broker: BrokerProcess) -> Iterator[Client]:
    """A client on the broker's admin socket."""
    with Client(broker.admin_address) as c:
        yield c
