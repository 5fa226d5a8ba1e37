"""Read one sample out of a Prometheus text exposition (for the metrics tests)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def metric_value(text: str, sample: str, **labels: str) -> float | None:
    """The value of ``sample`` (e.g. ``loraplex_requests_total``) whose labels include ``labels``."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None
