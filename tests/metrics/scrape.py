"""Scrape a broker's /metrics as Prometheus does (HTTP, text format, the official parser)."""

from __future__ import annotations

import ssl
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


class Scrape:
    """One scrape: families by name, and sample lookup by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: list[Sample] = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        """The one sample called `name` whose labels include `labels`."""
        hits = [
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert len(hits) == 1, f"{name}{labels}: {len(hits)} samples"
        return hits[0]

    def names(self) -> set[str]:
        return {s.name for s in self.samples}


def scrape(url: str, timeout: float = 5.0, context: ssl.SSLContext | None = None) -> Scrape:
    """GET `url` (https with `context`: the CA to trust and a client certificate)."""
    with urllib.request.urlopen(url, timeout=timeout, context=context) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return Scrape(r.read().decode())
