"""CommitPacer: a batch waits a millisecond for its siblings only where that has been seen
to pay (many calls arriving alone), never for one caller's back-to-back requests, nor
for session streams that already batch."""

from __future__ import annotations

from broker.engine.journal import CommitPacer


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def run(p: CommitPacer, clock: Clock, sizes: list[int], gap: float = 0.0002) -> list[float]:
    """Schedule and flush one batch per size; the delays the pacer chose."""
    delays = []
    for size in sizes:
        d = p.delay()
        delays.append(d)
        clock.t += gap + d
        p.flushed(size, d > 0)
    return delays


def test_one_caller_back_to_back_is_rarely_delayed() -> None:
    clock = Clock()
    p = CommitPacer(clock)
    delays = run(p, clock, [1] * 5000)
    tries = sum(1 for d in delays if d)
    # Each try that gathers nothing doubles the wait: 8, 16, ... 256, then every 256:
    # under 1 % of the requests wait the millisecond.
    assert 0 < tries <= 5000 * 0.01
    assert not p.delaying


def test_many_calls_arriving_alone_are_gathered() -> None:
    clock = Clock()
    p = CommitPacer(clock)
    # Small and frequent (the first counts from the second: nothing came before it).
    assert run(p, clock, [1, 1, 2, 1, 1, 2, 1, 1, 1]) == [0.0] * 9
    assert p.delay() == CommitPacer.DELAY  # the try
    p.flushed(7, True)  # it gathered 6 more
    assert p.delaying
    assert run(p, clock, [6, 7, 5]) == [CommitPacer.DELAY] * 3
    # The load goes: a delayed batch gathers nothing, and flushing is immediate again.
    assert run(p, clock, [1]) == [CommitPacer.DELAY]
    assert not p.delaying
    # After a lull the next try comes after a run of RUN again; a try that gathers
    # nothing makes the next one wait twice as long.
    assert run(p, clock, [1] * 8) == [0.0] * 8
    assert p.delay() == CommitPacer.DELAY
    p.flushed(1, True)
    assert run(p, clock, [1] * 16) == [0.0] * 16
    assert p.delay() == CommitPacer.DELAY


def test_streams_that_batch_already_are_never_delayed() -> None:
    clock = Clock()
    p = CommitPacer(clock)
    assert set(run(p, clock, [6, 8, 5, 7] * 500)) == {0.0}


def test_single_calls_far_apart_are_never_delayed() -> None:
    clock = Clock()
    p = CommitPacer(clock)
    assert set(run(p, clock, [1] * 1000, gap=0.05)) == {0.0}
