"""SIGTERM drains: while in-flight calls finish, a session resume or re-attach is refused
UNAVAILABLE (the set is kept for the restart), and the client library's reconnect path
takes that as "retry" and resumes after the restart."""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from pasid.v1 import broker_pb2 as pb
from pasid.v1 import broker_pb2_grpc as pb_grpc
from pasid_client import Client, SessionState, Unavailable
from pasid_client.handshake import obtain_ticket

from tests.harness import BrokerProcess, wait_until

SHUTTING_DOWN = "broker is shutting down; resume after the restart"


def open_detached(address: str) -> tuple[int, str]:
    """An anonymous session (no ticket) whose stream then breaks: its set is detached,
    kept for its grace. Returns its set id and resume token."""
    requests: queue.Queue[pb.SessionRequest | None] = queue.Queue()
    requests.put(pb.SessionRequest(tag=0, open=pb.OpenSession(client="anon", grace_seconds=120)))

    def stream() -> Iterator[pb.SessionRequest]:
        while (r := requests.get()) is not None:
            yield r

    with grpc.insecure_channel(address) as ch:
        call = pb_grpc.PasidBrokerStub(ch).Session(stream())
        opened = next(call).opened
        call.cancel()  # a broken stream, not a release
        requests.put(None)
    return opened.set_id, opened.token


class PendingOpen:
    """A Session stream started now whose open is sent later: grpc lets a stream that
    began before SIGTERM go on while the broker drains, so its open reaches the broker."""

    def __init__(self, address: str) -> None:
        self._requests: queue.Queue[pb.SessionRequest | None] = queue.Queue()
        self._channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(self._channel).result(timeout=10)

        def stream() -> Iterator[pb.SessionRequest]:
            while (r := self._requests.get()) is not None:
                yield r

        self._call = pb_grpc.PasidBrokerStub(self._channel).Session(stream())

    def open(self, **fields: Any) -> grpc.RpcError | pb.SessionOpened:
        """Send the open; the error, or what was opened (then the stream is cancelled)."""
        self._requests.put(pb.SessionRequest(tag=0, open=pb.OpenSession(client="raw", **fields)))
        try:
            return next(self._call).opened
        except grpc.RpcError as exc:
            return exc
        finally:
            self._call.cancel()
            self._requests.put(None)
            self._channel.close()


def _slowed_broker() -> tuple[BrokerProcess, Path]:
    """A broker whose commits take 4 s while the returned file exists: the test creates
    it just before the alloc it keeps in flight across SIGTERM (the drain then waits for
    it), so that the start, the opens and the restart around it commit at speed."""
    b = BrokerProcess("--drain-seconds", "30")
    slow = b.dir / "slow-commits"
    b.env["PASID_BROKER_TEST_FAULTS"] = f"commit_delay_ms=4000,commit_delay_file={slow}"
    return b, slow


def test_resume_and_reattach_are_refused_while_draining() -> None:
    """An alloc in flight (its commit slowed by the test-only fault hook) keeps the broker
    draining after SIGTERM. Streams that began before it then send their opens: a token
    resume, a ticketed re-attach and a new session are refused UNAVAILABLE saying why (the
    library's reconnect retries on it); after the restart the resume and the re-attach
    succeed: both sets were kept."""
    b, slow = _slowed_broker()
    try:
        b.start()
        anon_id, token = open_detached(b.address)
        # `busy` does not reconnect: closed (leaving the block) while the broker is gone,
        # its close would carry its release through, waiting for a restart that this
        # test makes only afterwards.
        with Client(b.address) as c, Client(b.address, reconnect_deadline_seconds=0) as c0:
            vm = c.session("vm", grace_seconds=120)
            assert vm.verified
            vm_id = vm.set_id
            vm.detach()
            busy = c0.session("busy")
            pending = [PendingOpen(b.address) for _ in range(3)]
            done: list[object] = []
            t = threading.Thread(target=lambda: done.append(busy.alloc()), daemon=True)
            slow.touch()
            t.start()
            time.sleep(1.0)  # the alloc is now waiting for its slow commit (4 s)
            # Before SIGTERM: a draining broker's peer socket issues no ticket.
            ticket = obtain_ticket(os.path.join(b.dir, "peer.sock")).ticket
            assert b.proc is not None
            b.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: "draining" in b.read_log(), what="draining")
            resumed = pending[0].open(resume_token=token, grace_seconds=120)
            reattached = pending[1].open(reattach_set_id=vm_id, ticket=ticket)
            new = pending[2].open()
            assert b.proc.poll() is None, "the broker was still draining"
            t.join(30)
            assert done, "the in-flight alloc was answered before the broker went"
        assert b.proc.wait(40) == 0
        slow.unlink()  # the restarted broker commits at speed
        for got, says in (
            (resumed, SHUTTING_DOWN),
            (reattached, SHUTTING_DOWN),
            (new, "broker is shutting down; open the session after the restart"),
        ):
            assert isinstance(got, grpc.RpcError), got
            assert (got.code(), got.details()) == (grpc.StatusCode.UNAVAILABLE, says)
        b.start()
        again = PendingOpen(b.address).open(resume_token=token)
        assert isinstance(again, pb.SessionOpened) and again.resumed, again
        assert again.set_id == anon_id
        ticket = obtain_ticket(os.path.join(b.dir, "peer.sock")).ticket
        back = PendingOpen(b.address).open(reattach_set_id=vm_id, ticket=ticket)
        assert isinstance(back, pb.SessionOpened) and back.set_id == vm_id, back
    finally:
        b.cleanup()


def test_the_peer_socket_refuses_handshakes_while_draining() -> None:
    """While the broker drains, its peer socket issues no ticket (one would die with the
    process): every handshake is answered UNAVAILABLE "handshake again after the
    restart". The client library takes it as it takes the gRPC socket's refusal: an open
    made during the drain waits and opens, verified, on the restarted broker, and a
    session whose stream the drain ended resumes its set there."""
    b, slow = _slowed_broker()
    try:
        b.start()
        with Client(b.address) as c, ThreadPoolExecutor(1) as pool:
            vm = c.session("vm", grace_seconds=120)
            assert vm.verified
            vm_id = vm.set_id
            busy = c.session("busy")
            done: list[object] = []
            t = threading.Thread(target=lambda: done.append(busy.alloc()), daemon=True)
            slow.touch()
            t.start()
            time.sleep(1.0)  # the alloc is now waiting for its slow commit (4 s)
            assert b.proc is not None
            b.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: "draining" in b.read_log(), what="draining")
            with pytest.raises(Unavailable) as refused:
                obtain_ticket(os.path.join(b.dir, "peer.sock"))
            assert (refused.value.code, refused.value.message) == (
                grpc.StatusCode.UNAVAILABLE,
                "broker is shutting down; handshake again after the restart",
            )
            late = pool.submit(c.session, "late")
            assert b.proc.poll() is None, "the broker was still draining"
            t.join(30)
            assert done, "the in-flight alloc was answered before the broker went"
            assert b.proc.wait(40) == 0
            assert not late.done(), f"the open did not wait for the restart: {late.result()}"
            slow.unlink()  # the restarted broker commits at speed
            b.start()
            opened = late.result(60)
            assert opened.verified and len(opened.alloc(1, 1000)) == 1
            wait_until(lambda: vm.state is SessionState.RESUMED, 60, 0.05, "the resume")
            assert vm.set_id == vm_id and vm.verified and len(vm.alloc(1, 1000)) == 1
    finally:
        b.cleanup()
