"""One Prometheus exposition for the cluster: every replica's metrics with a ``replica`` label."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

REPLICA_LABEL = "replica"


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def merge_expositions(by_replica: Mapping[str, str], extra: list[Metric] | None = None) -> bytes:
    """The text format of all replicas' families, each sample labelled ``replica="<id>"``.

    Families of the same name (every replica has the same ones) become one family, so the
    output has one ``# HELP`` / ``# TYPE`` per metric, as Prometheus requires.
    """
    merged: dict[str, Metric] = {}
    for replica in sorted(by_replica):
        for family in text_string_to_metric_families(by_replica[replica]):
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            for sample in family.samples:
                labels = {**sample.labels, REPLICA_LABEL: replica}
                target.add_sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*merged.values(), *(extra or [])]))
    return generate_latest(registry)
