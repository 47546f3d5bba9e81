"""
The pools' per-transaction histograms (L{pgtls_twisted.ops._metrics.PlainHistogram}):
plain bucket counts that must export exactly what a C{prometheus_client}
histogram fed the same observations would, boundaries included.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import HistogramMetricFamily

from pgtls_twisted.ops._metrics import _DURATION_BUCKETS, _LATENCY_BUCKETS, PlainHistogram


def _samples(family: HistogramMetricFamily) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels.get("le", "")): s.value for s in family.samples}


def test_plain_histogram_exports_what_prometheus_client_would() -> None:
    observations = [0.0, 0.0005, 0.00051, 0.001, 0.02, 0.5, 1, 7, 10, 11, 400, 0.0049999]
    for bounds in (_LATENCY_BUCKETS, _DURATION_BUCKETS):
        registry = CollectorRegistry()
        reference = Histogram("h", "doc", ["route"], buckets=bounds, registry=registry)
        plain = PlainHistogram(bounds)
        for value in observations:
            reference.labels("r").observe(value)
            plain.observe(value)
        family = HistogramMetricFamily("h", "doc", labels=["route"])
        plain.addTo(family, ["r"])
        [expected] = [m for m in registry.collect() if m.name == "h"]
        wanted = {
            (s.name, s.labels.get("le", "")): s.value
            for s in expected.samples
            if not s.name.endswith("_created")
        }
        assert _samples(family) == wanted
