"""Prometheus metrics, read from the store at scrape time so every replica (and a restarted one) agrees.

    registry = CollectorRegistry(); registry.register(StoreCollector(store))
    generate_latest(registry)   # moedisco_jobs{owner,state}, moedisco_stage_duration_seconds_*,
                                # moedisco_spent_usd_total{owner,tier} (compute),
                                # moedisco_billed_usd{owner,group} (node-hours at group prices)

The store, not process memory, is the source: a job's stages may have run under an API process long gone.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from service.schemas import JOB_STATES
from service.store.billing import billed_by_owner_and_group
from service.store.models import BOOTSTRAP_ADMIN
from service.store.store import Store

DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600)


def _histogram(values: list[float]) -> tuple[list[tuple[str, float]], float]:
    counts = [0] * (len(DURATION_BUCKETS) + 1)
    for value in values:
        counts[bisect.bisect_left(DURATION_BUCKETS, value)] += 1
    cumulative, buckets = 0, []
    for bound, count in zip([*map(str, DURATION_BUCKETS), "+Inf"], counts):
        cumulative += count
        buckets.append((bound, cumulative))
    return buckets, sum(values)


class StoreCollector(Collector):
    def __init__(self, store: Store):
        self.store = store

    def collect(self) -> Iterator[Metric]:
        counts = self.store.count_by_owner_and_state()
        jobs = GaugeMetricFamily("moedisco_jobs", "Jobs by owner and state.", labels=["owner", "state"])
        # Every state of every owner (the admin's even in an empty store), zeros included, so a rate or an alert
        # never sees a series vanish.
        for owner in sorted({BOOTSTRAP_ADMIN, *(owner for owner, _ in counts)}):
            for state in JOB_STATES:
                jobs.add_metric([owner, state], counts.get((owner, state), 0))
        yield jobs
        durations = HistogramMetricFamily("moedisco_stage_duration_seconds", "Wall time of finished stages.",
                                          labels=["stage"])
        by_stage: dict[str, list[float]] = {}
        for stage, seconds in self.store.finished_stage_seconds():
            by_stage.setdefault(stage, []).append(seconds)
        for stage, values in sorted(by_stage.items()):
            buckets, total = _histogram(values)
            durations.add_metric([stage], buckets, total)
        yield durations
        spent = CounterMetricFamily("moedisco_spent_usd", "Compute dollars by owner and tier: device-hours of the "
                                                          "priced stages of all jobs.", labels=["owner", "tier"])
        for (owner, tier), usd in sorted(self.store.usd_by_owner_and_tier().items()):
            spent.add_metric([owner, tier], usd or 0.0)
        yield spent
        # A gauge: a node's time is re-split as jobs come and go on it, so the figure can also go down.
        billed = GaugeMetricFamily("moedisco_billed_usd", "Billed dollars by owner and node group: the node-hours "
                                                          "jobs caused, at the group's price (what budgets count).",
                                   labels=["owner", "group"])
        for (owner, group), usd in sorted(billed_by_owner_and_group(self.store, time.time()).items()):
            billed.add_metric([owner, group], usd)
        yield billed
