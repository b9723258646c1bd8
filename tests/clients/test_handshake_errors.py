"""The client library's handshake refusals that need no broker: they are decided before
any connection (a TCP target has no peer socket; pidfd_open refuses a pid)."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from pasid_client.errors import PasidClientError
from pasid_client.handshake import holder_ticket, open_delegate


def test_listing_a_holders_sets_over_tcp_is_a_failed_precondition() -> None:
    with pytest.raises(PasidClientError) as e:
        holder_ticket("127.0.0.1:1")
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "needs the broker's peer socket; none for 127.0.0.1:1" in str(e.value)


def test_delegating_to_a_process_that_is_gone_is_not_found() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid names no process (until reused, which is rare)
    with pytest.raises(PasidClientError) as e:
        open_delegate(gone.pid)
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert f"no process {gone.pid} to delegate" in str(e.value)
