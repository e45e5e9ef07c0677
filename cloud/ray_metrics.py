"""/metrics of several cloud replicas as one Prometheus exposition, every sample labelled with its replica."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def merge_expositions(texts: dict[str, str], label: str = "replica") -> bytes:
    """{replica name: its exposition} -> one exposition whose samples carry `label="<replica name>"`."""
    families: dict[str, Metric] = {}
    for replica, text in texts.items():
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples.extend(
                Sample(s.name, {label: replica, **s.labels}, s.value, s.timestamp, s.exemplar) for s in family.samples
            )
    registry = CollectorRegistry()
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


class _Fixed:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self):
        return self.families
