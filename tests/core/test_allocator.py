"""The allocator's rules, one by one (the property tests drive them at random)."""

from __future__ import annotations

import re

import pytest

from broker.core import (
    Allocator,
    Exhausted,
    InvalidRange,
    Namespace,
    Quarantine,
    QuotaExceeded,
    Quotas,
    runs,
)


def test_namespace_lowest_free_crosses_full_words_and_levels() -> None:
    ns = Namespace(20)
    for p in range(0, 64 * 64 + 5):
        ns.take(p)
    assert ns.lowest_free(0, ns.size - 1) == 64 * 64 + 5
    ns.release(7)
    assert ns.lowest_free(0, ns.size - 1) == 7
    assert ns.lowest_free(8, ns.size - 1) == 64 * 64 + 5
    assert ns.lowest_free(0, 6) is None


def test_namespace_full_returns_none_and_memory_is_sparse() -> None:
    ns = Namespace(8)
    ns.take_range(0, 255)
    assert ns.lowest_free(0, 255) is None
    assert ns.used == 256
    ns.release(255)
    assert ns.lowest_free(0, 255) == 255
    assert list(Namespace(20).iter_used()) == []


def test_namespace_take_range_sets_whole_words_and_keeps_invariants() -> None:
    ns = Namespace(20)
    assert ns.take_range(1, (1 << 19) - 1) == (1 << 19) - 1
    assert ns.words_held() < (1 << 19) // 64 + 200  # words, not bits
    ns.check()
    assert ns.lowest_free(0, ns.size - 1) == 0
    ns.take(0)
    assert ns.lowest_free(0, ns.size - 1) == 1 << 19
    assert ns.take_range(100, 1 << 19) == 1  # only the one still free
    ns.check()
    with pytest.raises(ValueError, match="outside"):
        ns.take_range(5, ns.size)


def test_namespace_release_many_clears_words_and_full_marks() -> None:
    ns = Namespace(13)
    ns.take_range(0, ns.size - 1)
    assert ns.lowest_free(0, ns.size - 1) is None
    gone = [3, 64, 65, 4095, 4096, 8191]
    assert ns.release_many(gone) == len(gone)
    ns.check()
    assert ns.used == ns.size - len(gone)
    assert [ns.lowest_free(p, ns.size - 1) for p in (0, 4, 66, 4097)] == [3, 64, 4095, 8191]


def test_namespace_take_many_is_all_or_nothing_and_matches_take() -> None:
    want = [0, 1, 63, 64, *range(4096, 4096 + 64 * 63), 8191]  # whole words, and more
    bulk, one = Namespace(13), Namespace(13)
    assert bulk.take_many(want) == len(want)
    for p in want:
        one.take(p)
    bulk.check()
    assert list(bulk.iter_used()) == list(one.iter_used())
    assert bulk.lowest_free(4096, bulk.size - 1) == one.lowest_free(4096, one.size - 1)
    before = list(bulk.iter_used())
    for bad, why in (([5, 64], "64 in use"), ([7, 7], "listed twice"), ([9, 8192], "outside")):
        with pytest.raises(ValueError, match=why):
            bulk.take_many(bad)
        assert list(bulk.iter_used()) == before and bulk.used == len(before)


def test_namespace_release_range_frees_only_what_is_used() -> None:
    ns = Namespace(13)
    ns.take_range(0, ns.size - 1)
    ns.release(100)
    assert ns.release_range(64, 4160) == 4160 - 64 + 1 - 1
    ns.check()
    assert ns.used == ns.size - (4160 - 64 + 1)
    assert ns.lowest_free(0, ns.size - 1) == 64
    assert ns.lowest_free(4161, ns.size - 1) is None
    assert ns.release_range(8000, 1 << 40) == 192  # past the end: bounded by the space
    ns.check()


def test_claim_after_restart_takes_words_and_names_a_conflict() -> None:
    a = Allocator(20)
    a.create_set(1, "vm")
    a.create_set(2, "vm")
    assert a.claim(1, range(1, 5000)) == list(range(1, 5000))
    assert a.in_use == 4999
    with pytest.raises(ValueError, match="PASID 4999 is already held"):
        a.claim(2, [6000, 4999])
    assert a.in_use == 4999 and list(a.get_set(2).pasids) == []
    assert a.alloc(2, 6000, 6000) == [6000]  # nothing of the refused claim was taken


def test_namespace_check_catches_a_broken_invariant() -> None:
    ns = Namespace(12)
    ns.take_range(0, 63)
    ns.used += 1
    with pytest.raises(AssertionError, match="used"):
        ns.check()


def test_pasid_zero_is_never_handed_out() -> None:
    a = Allocator(20)
    a.create_set(1, "vm")
    assert a.alloc(1, 0, 10) == [1]
    with pytest.raises(Exhausted):
        a.alloc(1, 0, 0)


def test_lowest_free_and_batch_all_or_nothing() -> None:
    a = Allocator(4, quotas=Quotas(per_set=0))  # PASIDs 1..15
    a.create_set(1, "a")
    a.create_set(2, "b")
    assert a.alloc(1, 1, 15, count=3) == [1, 2, 3]
    assert a.alloc(2, 1, 15, count=2) == [4, 5]
    a.free_range(1, 2, 2)
    assert a.alloc(2, 1, 15) == [2]
    before = a.in_use
    with pytest.raises(Exhausted, match="no 20 free PASIDs"):
        a.alloc(1, 1, 15, count=20)
    assert a.in_use == before  # nothing taken


@pytest.mark.parametrize(
    ("lo", "hi", "msg"),
    [
        (5, 4, "min 5 > max 4"),
        (1, 1 << 20, "max 1048576 >= 2^20"),
        (1 << 20, 1 << 20, "max 1048576 >= 2^20"),
    ],
)
def test_alloc_range_checks_use_ge(lo: int, hi: int, msg: str) -> None:
    a = Allocator(20)
    a.create_set(1, "a")
    with pytest.raises(InvalidRange, match=re.escape(msg)):
        a.alloc(1, lo, hi)
    assert a.alloc(1, (1 << 20) - 1, (1 << 20) - 1) == [(1 << 20) - 1]


def test_free_only_touches_own_pasids_and_any_32bit_range() -> None:
    a = Allocator(20)
    a.create_set(1, "a")
    a.create_set(2, "b")
    mine = a.alloc(1, 1, 100, count=10)
    theirs = a.alloc(2, 1, 100, count=10)
    assert a.free_range(1, 0, 2**32 - 1) == mine
    assert list(a.sets[2].pasids) == theirs
    with pytest.raises(InvalidRange):
        a.free_range(1, 9, 8)


def test_quotas_name_kind_and_limit() -> None:
    a = Allocator(20, quotas=Quotas(per_set=3, per_client=5, global_=6))
    a.create_set(1, "vm")
    a.create_set(2, "vm")
    a.create_set(3, "other")
    a.alloc(1, 1, 1000, count=3)
    with pytest.raises(QuotaExceeded) as e:
        a.alloc(1, 1, 1000)
    assert (e.value.kind, e.value.limit) == ("set", 3)
    a.alloc(2, 1, 1000, count=2)
    with pytest.raises(QuotaExceeded) as e:
        a.alloc(2, 1, 1000)
    assert (e.value.kind, e.value.limit) == ("client", 5)
    a.alloc(3, 1, 1000)
    with pytest.raises(QuotaExceeded) as e:
        a.alloc(3, 1, 1000)
    assert (e.value.kind, e.value.limit) == ("global", 6)


def test_destroy_and_claim_restore_exact_state() -> None:
    a = Allocator(20)
    a.create_set(1, "a")
    got = a.alloc(1, 1, 100, count=5)
    freed = a.destroy_set(1)
    assert freed == got and a.in_use == 0
    a.create_set(1, "a")
    a.claim(1, freed)
    assert list(a.sets[1].pasids) == got and a.in_use == 5
    a.create_set(2, "b")
    with pytest.raises(ValueError, match="already held"):
        a.claim(2, [got[0]])


def test_reserved_ranges_are_never_handed_out() -> None:
    a = Allocator(8, reserved=[(1, 63)], quotas=Quotas(per_set=0))
    a.create_set(1, "a")
    assert a.alloc(1, 0, 255) == [64]
    assert a.capacity == 256 - 64


def test_runs() -> None:
    assert runs([1, 2, 3, 7, 9, 10]) == [(1, 3), (7, 7), (9, 10)]
    assert runs([]) == []


class FakeClock:
    """A clock the test moves by hand (the core reads no clock of its own)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_quarantine_by_time_holds_a_freed_pasid_back() -> None:
    clock = FakeClock()
    a = Allocator(8, quotas=Quotas(per_set=0), quarantine=Quarantine(seconds=5), clock=clock)
    a.create_set(1, "a")
    a.create_set(2, "b")
    assert a.alloc(1, 1, 255, count=3) == [1, 2, 3]
    assert a.free_range(1, 0, 2**32 - 1) == [1, 2, 3]
    assert (a.in_use, a.quarantined, a.available) == (0, 3, a.capacity - 3)
    assert a.alloc(2, 1, 255) == [4]  # not 1: still quarantined
    clock.now += 4.9
    assert a.alloc(2, 1, 255) == [5]
    clock.now += 0.1
    assert a.alloc(2, 1, 255) == [1]
    assert a.quarantined == 0
    a.check()


def test_restored_quarantine_keeps_its_remaining_time_capped_never_shortened() -> None:
    """After a restart: each PASID for its remaining seconds, at most the configured ones
    (a clock stepped back), skipping what a set holds (a stale row) or what has no time
    left; the allocs condition restarts counting."""
    clock = FakeClock()
    q = Quarantine(seconds=5, allocs=1)
    a = Allocator(8, quotas=Quotas(per_set=0), quarantine=q, clock=clock, report_expired=True)
    a.create_set(1, "a")
    a.claim(1, [2])  # held by a set: a quarantine row for it is stale
    back = a.restore_quarantine({1: 3.0, 2: 4.0, 3: 999.0, 4: 0.0, 5: -1.0, 300: 2.0})
    assert back == [1, 3] and a.quarantined_pasids() == [1, 3]
    a.check()
    assert a.alloc(1, 1, 255) == [4]  # the allocs count restarted at 0: this is the 1st
    clock.now += 3.0
    assert a.alloc(1, 1, 255) == [1]  # its 3 s are over, and 1 PASID was handed out since
    clock.now += 1.9
    with pytest.raises(Exhausted):
        a.alloc(1, 3, 3)  # capped to 5 s, not 999: 4.9 s in, still quarantined
    clock.now += 0.1
    assert a.alloc(1, 3, 3) == [3]
    assert a.take_expired() == [1, 3]  # the engine frees these in the backend
    a.check()


def test_restore_quarantine_is_a_no_op_without_seconds() -> None:
    a = Allocator(8, quarantine=Quarantine(allocs=4))
    assert a.restore_quarantine({1: 3.0}) == [] and a.quarantined == 0


def test_quarantine_by_allocs_counts_pasids_handed_out_since() -> None:
    a = Allocator(8, quotas=Quotas(per_set=0), quarantine=Quarantine(allocs=2))
    a.create_set(1, "a")
    assert a.alloc(1, 1, 255) == [1]
    a.destroy_set(1)
    a.create_set(2, "b")
    assert a.alloc(2, 1, 255) == [2]  # 0 allocs since the free
    assert a.alloc(2, 1, 255) == [3]  # 1
    assert a.alloc(2, 1, 255) == [1]  # 2: back in the pool
    a.check()


def test_quarantine_with_both_conditions_needs_both() -> None:
    clock = FakeClock()
    q = Quarantine(seconds=1, allocs=1)
    a = Allocator(8, quotas=Quotas(per_set=0), quarantine=q, clock=clock)
    a.create_set(1, "a")
    a.alloc(1, 1, 1)
    a.free_range(1, 1, 1)
    clock.now += 10
    assert a.alloc(1, 1, 255) == [2]  # time is up, but no alloc since
    assert a.alloc(1, 1, 255) == [1]


def test_quarantine_exhaustion_names_it_and_undo_claims_back() -> None:
    a = Allocator(4, quotas=Quotas(per_set=0), quarantine=Quarantine(allocs=100))
    a.create_set(1, "a")
    a.create_set(2, "b")
    got = a.alloc(1, 1, 15, count=15)
    a.free_range(1, 1, 15)
    with pytest.raises(Exhausted, match="15 quarantined"):
        a.alloc(2, 1, 15)
    with pytest.raises(ValueError, match="quarantined"):
        a.claim(2, [1])  # another set cannot take it
    a.claim(1, got)  # the freeing set can (undo of a failed commit)
    assert (a.in_use, a.quarantined) == (15, 0)
    a.check()


def test_release_undoing_an_alloc_skips_quarantine() -> None:
    a = Allocator(8, quarantine=Quarantine(allocs=100))
    a.create_set(1, "a")
    got = a.alloc(1, 1, 255, count=2)
    a.release(1, got)
    assert a.quarantined == 0
    assert a.alloc(1, 1, 255, count=2) == got


def test_quarantine_in_seconds_needs_a_clock() -> None:
    with pytest.raises(ValueError, match="clock"):
        Allocator(8, quarantine=Quarantine(seconds=1))


def test_claim_says_what_a_backend_must_hold_again() -> None:
    """With report_expired, a PASID that left quarantine but was not yet reported is still
    held by the backend: claiming it back must not ask the backend for it again."""
    a = Allocator(8, quarantine=Quarantine(allocs=1), report_expired=True)
    a.create_set(1, "a")
    a.create_set(2, "b")
    assert a.alloc(1, 1, 255, count=3) == [1, 2, 3]
    a.free_range(1, 1, 3)
    a.alloc(2, 10, 10)
    assert a.expire_quarantine() == [1, 2, 3]  # due now; not yet taken by the caller
    assert a.claim(1, [1, 2]) == []  # the backend never let go of them
    assert a.take_expired() == [3]
    assert a.claim(1, [3, 20]) == [3, 20]  # 3 was reported (so freed there); 20 was free
    a.check()


def test_take_lowest_by_words_matches_the_bit_walk() -> None:
    """A batch takes whole free words at once; it must take exactly the PASIDs a walk of
    lowest_free would, across partly used words, full words and the range's ends."""
    import random

    from broker.core.namespace import Namespace

    rnd = random.Random(12)
    for _ in range(200):
        a, b = Namespace(12), Namespace(12)
        for p in rnd.sample(range(4096), rnd.randrange(0, 3000)):
            a.take(p)
            b.take(p)
        lo = rnd.randrange(0, 4096)
        hi = rnd.randrange(lo, 4096)
        count = rnd.randrange(1, 600)
        want: list[int] = []
        p = b.lowest_free(lo, hi)
        while p is not None and len(want) < count:
            b.take(p)
            want.append(p)
            p = b.lowest_free(p + 1, hi) if p < hi else None
        assert a.take_lowest(lo, hi, count) == want
        assert a.used == b.used
        assert all(a.is_used(q) == b.is_used(q) for q in range(4096))
        assert a.lowest_free(0, 4095) == b.lowest_free(0, 4095)


def test_withheld_pasids_stay_out_of_the_pool_until_released() -> None:
    """A failed DETACH (issue 22, point 7): the PASID is in no set and never handed out
    until release_withheld; a set that takes it back (a destroy undone) keeps it."""
    a = Allocator(4, quarantine=Quarantine(allocs=100))
    a.create_set(1, "vm")
    assert a.alloc(1, 1, 15, 3) == [1, 2, 3]
    a.destroy_set(1)  # 1, 2, 3 into quarantine (allocs)
    assert a.withhold([2, 5]) == [2, 5]  # one quarantined, one free
    assert a.quarantined == 4 and a.withheld == [2, 5]
    a.check()
    a.create_set(2, "vm2")
    assert 5 not in a.alloc(2, 1, 15, 10)
    a.check()
    assert a.release_withheld([5, 9]) == []  # 9 was never withheld; 5 into quarantine
    assert a.withheld == [2]
    a.check()
    a.create_set(3, "vm3")
    assert a.claim(3, [2]) == []  # taken back: the backend never let go of it
    assert a.withheld == []
    a.check()


def test_withheld_without_a_quarantine_goes_straight_back() -> None:
    a = Allocator(4)
    a.create_set(1, "vm")
    a.alloc(1, 1, 15, 2)
    a.destroy_set(1)
    a.withhold([1])
    a.create_set(2, "vm2")
    assert a.alloc(2, 1, 15) == [2]
    assert a.release_withheld([1]) == [1]
    assert a.alloc(2, 1, 15) == [1]
    a.check()
