"""broker/loop_metrics.py against prometheus_client itself: the same observations give the
same exposition, byte for byte, so that dashboards cannot tell which one counted."""

from __future__ import annotations

import random
import threading

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from broker.loop_metrics import LoopMetrics
from broker.metrics import LATENCY_BUCKETS


def test_same_exposition_as_prometheus_client() -> None:
    rng = random.Random(12)
    ref, ours = CollectorRegistry(), CollectorRegistry()
    hot = LoopMetrics()
    c_ref = Counter("pb_things", "Things by kind.", ["kind"], registry=ref)
    c_ours = hot.counter("pb_things", "Things by kind.", ["kind"])
    plain_ref = Counter("pb_plain_total", "Unlabelled.", registry=ref)
    plain_ours = hot.counter("pb_plain_total", "Unlabelled.")
    h_ref = Histogram("pb_seconds", "Durations.", ["op"], buckets=LATENCY_BUCKETS, registry=ref)
    h_ours = hot.histogram("pb_seconds", "Durations.", LATENCY_BUCKETS, ["op"])
    single_ref = Histogram("pb_one_seconds", "One.", buckets=LATENCY_BUCKETS, registry=ref)
    single_ours = hot.histogram("pb_one_seconds", "One.", LATENCY_BUCKETS)
    ours.register(hot)
    # Values on the bucket bounds too: `le` is inclusive in both.
    values = [*LATENCY_BUCKETS, 0.0, 2.0, *(rng.expovariate(5000) for _ in range(2000))]
    for v in values:
        op = rng.choice(["alloc", "free"])
        h_ref.labels(op).observe(v)
        h_ours.labels(op).observe(v)
        single_ref.observe(v)
        single_ours.observe(v)
        kind = rng.choice(["a", "b", "c"])
        n = rng.randint(1, 5)
        c_ref.labels(kind).inc(n)
        c_ours.labels(kind).inc(n)
        plain_ref.inc()
        plain_ours.inc()
    # prometheus_client rounds the sum its own way; compare parsed samples, values within
    # float rounding, and the text line by line apart from the sums.
    assert _samples(generate_latest(ours)) == _samples(generate_latest(ref))
    # The broker turns `_created` series off (broker/metrics.py); these registries did not.
    ours_lines = _lines(generate_latest(ours))
    ref_lines = _lines(generate_latest(ref))
    assert sorted(ours_lines) == sorted(ref_lines)


def _lines(text: bytes) -> list[str]:
    return [x for x in text.decode().splitlines() if "_sum" not in x and "_created" not in x]


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            v = round(s.value, 9) if s.name.endswith("_sum") else s.value
            out[(s.name, tuple(sorted(s.labels.items())))] = v
    return out


def test_a_scrape_during_updates_sees_consistent_buckets() -> None:
    """A scrape runs on the HTTP thread while the loop thread counts: every scrape's
    +Inf bucket equals its _count, and buckets never decrease along `le`."""
    reg = CollectorRegistry()
    hot = LoopMetrics()
    h = hot.histogram("pb_race_seconds", "Race.", LATENCY_BUCKETS, ["op"])
    reg.register(hot)
    stop = threading.Event()

    def count() -> None:
        i = 0
        while not stop.is_set():
            h.labels("op" + str(i % 7)).observe((i % 100) / 1000)
            i += 1

    t = threading.Thread(target=count)
    t.start()
    try:
        for _ in range(200):
            for fam in text_string_to_metric_families(generate_latest(reg).decode()):
                by_op: dict[str, list[float]] = {}
                counts = {}
                for s in fam.samples:
                    if s.name.endswith("_bucket"):
                        by_op.setdefault(s.labels["op"], []).append(s.value)
                    elif s.name.endswith("_count"):
                        counts[s.labels["op"]] = s.value
                for op, buckets in by_op.items():
                    assert buckets == sorted(buckets)
                    assert buckets[-1] == counts[op]
    finally:
        stop.set()
        t.join()


def test_labels_checked() -> None:
    hot = LoopMetrics()
    fam = hot.counter("pb_x", "X.", ["a"])
    try:
        fam.labels("1", "2")
    except ValueError as exc:
        assert "labels" in str(exc)
    else:
        raise AssertionError("wrong label count accepted")
