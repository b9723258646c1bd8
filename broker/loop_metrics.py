"""Counters and histograms for the request path: plain numbers, exposed at scrape time.

prometheus_client's Counter and Histogram take a lock on every update and a Histogram
walks its buckets in Python: about 10 µs of every stream alloc went to metrics, a fifth
of the broker's own cost (docs/performance.md). The request path runs on one thread, the
event loop's, so it needs no lock: an update here is an attribute add (a counter) or a
bisect and a list add (a histogram). A scrape, on the HTTP server's thread, copies the
numbers into ordinary metric families; the exposition is the same as prometheus_client's
own (names, `_total`, `le` spelled by floatToGoString).

One writer thread at a time per family: an update from two threads at once could lose
a count. The broker updates these only from its event loop (and from start-up recovery
before the loop serves).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class LoopCounter:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class LoopHistogram:
    """Bucket counts (not cumulative: the last is +Inf) and the sum of observations."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, i.e. the bucket `le` it counts in.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class CounterFamily:
    """A counter with labels; `labels(...)` once per label set, then `inc()` on it."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name.removesuffix("_total")
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], LoopCounter] = {}
        if not self.labelnames:
            self._children[()] = LoopCounter()

    def labels(self, *values: str) -> LoopCounter:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: labels {self.labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = LoopCounter()
        return child

    def inc(self, amount: float = 1) -> None:
        """The unlabelled counter's increment."""
        self._children[()].inc(amount)

    def collect(self) -> Metric:
        m = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):  # list(): one atomic copy
            m.add_metric(values, child.value)
        return m


class HistogramFamily:
    """A histogram with labels, like CounterFamily."""

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        labelnames: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(float(b) for b in buckets if b != float("inf"))
        self._les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        self._children: dict[tuple[str, ...], LoopHistogram] = {}
        if not self.labelnames:
            self._children[()] = LoopHistogram(self.bounds)

    def labels(self, *values: str) -> LoopHistogram:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: labels {self.labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = LoopHistogram(self.bounds)
        return child

    def observe(self, value: float) -> None:
        """The unlabelled histogram's observation."""
        self._children[()].observe(value)

    def collect(self) -> Metric:
        m = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            counts, total, acc = list(child.counts), child.sum, 0
            cumulative = []
            for le, n in zip(self._les, counts, strict=True):
                acc += n
                cumulative.append((le, float(acc)))
            m.add_metric(values, cumulative, total)
        return m


class LoopMetrics(Collector):
    """The families above, registered on a prometheus_client registry as one collector."""

    def __init__(self) -> None:
        self._families: list[CounterFamily | HistogramFamily] = []

    def counter(
        self, name: str, documentation: str, labelnames: Sequence[str] = ()
    ) -> CounterFamily:
        f = CounterFamily(name, documentation, labelnames)
        self._families.append(f)
        return f

    def histogram(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        labelnames: Sequence[str] = (),
    ) -> HistogramFamily:
        f = HistogramFamily(name, documentation, buckets, labelnames)
        self._families.append(f)
        return f

    def collect(self) -> Iterable[Metric]:
        return [f.collect() for f in self._families]

    def describe(self) -> Iterable[Metric]:
        # What the registry checks names against; no samples needed.
        return [
            (
                CounterMetricFamily(f.name, f.documentation, labels=f.labelnames)
                if isinstance(f, CounterFamily)
                else HistogramMetricFamily(f.name, f.documentation, labels=f.labelnames)
            )
            for f in self._families
        ]
