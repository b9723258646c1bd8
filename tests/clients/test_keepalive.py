"""The client library's keepalive (issue 22 point 6): a stopped broker is not a dead client.

On a Unix socket the library sends no pings: a broker frozen for longer than a ping
timeout (SIGSTOP here; a debugger or a stalled disk in production) must find the stream,
the set and the requests in flight as they were when it runs again.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from pasid_client import Client
from pasid_client.address import channel_options

from tests.harness import BrokerProcess

# With pings every 2 s and a 1 s ping timeout, a pinging client gives up after about 3 s
# (issue 22 saw "ping timeout" 5-6 s into a freeze with the 10 s default): the freeze is
# four times that.
PING_SECONDS = 2.0
FREEZE_SECONDS = 12.0


def test_unix_channels_do_not_ping_tcp_channels_do() -> None:
    unix = dict(channel_options("unix:/run/pasid-broker/broker.sock", 2.0))
    assert not [k for k in unix if "keepalive" in k or "ping" in k], unix
    tcp = dict(channel_options("10.0.0.1:7000", 2.0))
    assert tcp["grpc.keepalive_time_ms"] == 2000


def test_a_frozen_broker_keeps_the_stream_and_the_set(
    make_broker: Callable[..., BrokerProcess],
) -> None:
    b = make_broker()
    assert b.proc is not None
    with (
        Client(b.address, keepalive_seconds=PING_SECONDS) as c,
        Client(b.admin_address) as admin,
        c.session("frozen-broker") as s,
    ):
        assert s.verified and s.grace_seconds == 0  # the set ends with its stream
        assert s.alloc(1, 100, count=4) == [1, 2, 3, 4]
        pool = ThreadPoolExecutor(1)
        b.proc.send_signal(signal.SIGSTOP)
        try:
            in_flight = pool.submit(s.alloc, 1, 100)
            time.sleep(FREEZE_SECONDS)
            assert not in_flight.done(), in_flight.exception()
        finally:
            b.proc.send_signal(signal.SIGCONT)
        assert in_flight.result(30) == [5]  # answered on the same stream
        pool.shutdown()
        assert s.alloc(1, 100) == [6]
        (view,) = admin.list_sets()
        assert (view.set_id, view.state, view.ranges) == (s.set_id, "attached", ((1, 6),))
        assert admin.info().sessions == 1
