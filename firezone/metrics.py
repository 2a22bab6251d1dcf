"""Prometheus metrics read from plain counters at scrape time.

Packet paths only bump plain ints (attributes or dict entries of a stats object); a
:class:`CallbackCollector` turns them into Prometheus families when ``/metrics`` is scraped, so
nothing on the hot path touches prometheus_client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

Value = float | int | Mapping[str, float | int] | Mapping[tuple[str, ...], float | int]


@dataclass(frozen=True)
class MetricSpec:
    """One metric family: ``read()`` returns a number, or a mapping from label value(s) to numbers."""

    name: str
    help: str
    kind: str  # "counter" or "gauge"
    read: Callable[[], Value]
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("counter", "gauge"):
            raise ValueError(f"metric kind must be counter or gauge, not {self.kind!r}")


class CallbackCollector(Collector):
    """Collect a fixed list of :class:`MetricSpec` by calling their readers."""

    def __init__(self, specs: Iterable[MetricSpec]) -> None:
        self.specs = list(specs)

    def describe(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        return []

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        for spec in self.specs:
            family: CounterMetricFamily | GaugeMetricFamily
            if spec.kind == "counter":
                family = CounterMetricFamily(spec.name, spec.help, labels=spec.labels or None)
            else:
                family = GaugeMetricFamily(spec.name, spec.help, labels=spec.labels or None)
            value = spec.read()
            if spec.labels:
                if not isinstance(value, Mapping):
                    raise TypeError(f"metric {spec.name} has labels but read() gave a number")
                for key, v in sorted(value.items(), key=lambda kv: str(kv[0])):
                    label_values = [key] if isinstance(key, str) else [str(k) for k in key]
                    family.add_metric(label_values, float(v))
            else:
                family.add_metric([], float(value))  # type: ignore[arg-type]
            yield family


def new_registry(specs: Iterable[MetricSpec] = ()) -> CollectorRegistry:
    """A fresh registry (never the process-global one) holding a collector for ``specs``."""
    registry = CollectorRegistry(auto_describe=False)
    specs = list(specs)
    if specs:
        registry.register(CallbackCollector(specs))
    return registry
