"""The billed cost: what the cloud charges, the worker nodes' seconds at their group's price, attributed to jobs.

    nodes = [NodeLife(node="n1", group="cheap-4090", requested_at=0.0, started_at=40.0, ended_at=400.0)]
    uses = [Use(job="a", stage="submodel", expert=0, node="n1", start=50.0, end=250.0)]
    bill = attribute(nodes, uses, resources, now=500.0, job_starts={"a": 0.0})
    bill.for_job("a")          # BilledSpan rows: boot 0-50, busy 50-250, idle 250-370 (the idle timeout) ...
    bill.seconds() == sum(node.seconds(500.0) for node in nodes)   # no node-second twice, none left out

A node is billed from the autoscaler's request for it (without one, its start) to its end. Every stretch of its
life goes to exactly one kind, and its seconds to jobs by a declared rule:

| kind      | when                                                | whose                                           |
| busy      | work of one or more jobs holds resources on it      | those jobs, in proportion to their share of it  |
| boot      | requested, not yet used (VM boot, image pull)        | the first user, if it had started by the request|
|           |                                                     | (its demand launched the node); else nobody's    |
| between   | idle between two uses of one job (a barrier wait)   | that job                                        |
| idle      | idle after a use, up to the group's idle timeout    | the last user (the autoscaler keeps it that long)|
| unclaimed | any other idle time (kept by `min_nodes`, or a job  | nobody: the cluster's own cost (`job` None)     |
|           | that started after the node was requested)          |                                                 |

A use's share of a node is the largest fraction of any resource it holds (1 GPU of 1: the whole node); jobs present
at once split the moment by their shares, so a node's second is never split into more or less than one second.
Prices come from `ResourcesConfig.group_price` and change at `price_changes`; spans are cut there.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, Field

from moedisco.config.resources import ResourcesConfig

Kind = Literal["busy", "boot", "between", "idle", "unclaimed"]
KINDS: tuple[str, ...] = ("busy", "boot", "between", "idle", "unclaimed")
GROUP_LABEL = "ray.io/node-group"  # Ray's default label: the worker group (KubeRay's groupName) of the node
MARKET_LABEL = "ray.io/market-type"  # Ray's default label: `spot` or `on-demand`


@dataclass(frozen=True)
class NodeLife:
    """One worker node's life, as Ray and the autoscaler record it (unix seconds)."""

    node: str
    group: str  # its node group (a key of `resources.node_groups`, else a `tier:` group priced by the tier)
    started_at: float
    requested_at: float | None = None  # the autoscaler's launch request; None: not known, billed from the start
    ended_at: float | None = None  # None: alive
    resources: dict[str, float] = field(default_factory=dict)  # its logical resources (CPU, GPU)
    simulated: bool = False  # its GPUs are logical (the local simulated cluster)

    @property
    def billed_from(self) -> float:
        return min(self.requested_at, self.started_at) if self.requested_at is not None else self.started_at

    def billed_until(self, now: float) -> float:
        return self.ended_at if self.ended_at is not None else max(now, self.billed_from)

    def seconds(self, now: float) -> float:
        return self.billed_until(now) - self.billed_from


@dataclass(frozen=True)
class Use:
    """Work of `job` that held `resources` on `node` from `start` to `end` (None: still holding them)."""

    job: str
    node: str
    start: float
    end: float | None = None
    stage: str | None = None
    expert: int | None = None
    round: int | None = None
    resources: dict[str, float] = field(default_factory=dict)

    def until(self, now: float) -> float:
        return self.end if self.end is not None else now

    def share(self, node: NodeLife) -> float:
        """The largest fraction of any of the node's resources this use holds; the whole node when not known. A GPU
        counts whole (a job asking for 0.01 GPU keeps the card from others as much as one asking for all of it)."""
        held = {name: math.ceil(amount) if name == "GPU" else amount for name, amount in self.resources.items()}
        fractions = [amount / node.resources[name] for name, amount in held.items()
                     if amount > 0 and node.resources.get(name, 0) > 0]
        return min(1.0, max(fractions)) if fractions else 1.0


class BilledSpan(BaseModel):
    """A stretch of one node's life, of one kind, and the part of it one job (or nobody) pays."""

    job: str | None = Field(description="The job billed; None: the cluster's own cost.")
    node: str = Field(description="The Ray node id.")
    group: str = Field(description="The node group, whose price applies.")
    kind: Kind = Field(description="busy, boot, between (a wait between two uses), idle (before scale-down), "
                       "unclaimed.")
    stage: str | None = Field(description="The stage of the use it belongs to (the next use for boot).")
    expert: int | None = Field(description="The expert of that use.")
    round: int | None = Field(description="The synchronisation round of that use.")
    start: float = Field(description="Unix seconds.")
    end: float = Field(description="Unix seconds.")
    seconds: float = Field(description="The node-seconds billed: (end - start) x this job's share of the node.")
    price_per_hour: float = Field(description="The group's node-hour price then.")
    usd: float = Field(description="seconds / 3600 x price_per_hour.")
    simulated: bool = Field(description="The node's GPUs were logical (the local simulated cluster).")


@dataclass
class Bill:
    spans: list[BilledSpan]

    def for_job(self, job: str | None) -> list[BilledSpan]:
        return [span for span in self.spans if span.job == job]

    def seconds(self, job: str | None | Literal["all"] = "all") -> float:
        return sum(span.seconds for span in self.spans if job == "all" or span.job == job)

    def usd(self, job: str | None | Literal["all"] = "all") -> float:
        return sum(span.usd for span in self.spans if job == "all" or span.job == job)


def price_group(resources: ResourcesConfig, labels: dict[str, str]) -> str:
    """The node group whose price a node pays: its `ray.io/node-group` label when that names a group; else the
    first group of its tier label and market (`ray.io/market-type`, or the manifests' `market` label); else
    `tier:<label>`, a node the groups do not declare (`_Pricer` prices it)."""
    groups = resources.node_groups
    if (name := labels.get(GROUP_LABEL)) in groups:
        return name
    tier = labels.get(resources.label_key)
    market = labels.get(MARKET_LABEL) or labels.get("market") or "on-demand"
    for name, group in groups.items():
        if group.tier == tier and group.market == market:
            return name
    return f"tier:{tier}"


class _Pricer:
    def __init__(self, resources: ResourcesConfig):
        self.resources = resources

    def price(self, node: NodeLife, at: float) -> float:
        if node.group in self.resources.node_groups:
            return self.resources.group_price(node.group, at)
        # A node the groups do not declare: its GPUs at the per-GPU price of a declared group of its tier, else at
        # the dearest declared one. Never from a job's own tiers: a spec must not set the price it is billed at.
        tier, gpus = node.group.removeprefix("tier:"), max(1.0, node.resources.get("GPU", 1.0))
        per_gpu = [self.resources.group_price(name, at) / group.num_devices
                   for name, group in self.resources.node_groups.items() if group.tier == tier]
        if not per_gpu:
            per_gpu = [self.resources.group_price(name, at) / group.num_devices
                       for name, group in self.resources.node_groups.items()]
        return gpus * max(per_gpu, default=0.0)

    def steps(self, group: str) -> list[float]:
        return self.resources.price_steps(group) if group in self.resources.node_groups else []


@dataclass
class _Span:
    job: str | None
    kind: str
    use: Use | None
    start: float
    end: float
    fraction: float = 1.0
    price: float = 0.0  # dollars per node-hour over the whole stretch (a price change is always a cut)


def _cuts(node: NodeLife, uses: list[Use], pricer: _Pricer, idle_timeout_s: float, now: float) -> list[float]:
    begin, end = node.billed_from, node.billed_until(now)
    points = {begin, end, *pricer.steps(node.group)}
    for use in uses:
        points.update((use.start, use.until(now), use.until(now) + idle_timeout_s))
    return sorted(point for point in points if begin <= point <= end)


def _idle_owner(a: float, last: Use | None, following: Use | None, node: NodeLife, job_starts: dict[str, float],
                idle_timeout_s: float, now: float) -> tuple[str | None, str, Use | None]:
    """(job, kind, use) of an idle stretch starting at `a`, between the use that ended last before it and the
    next one to start."""
    if last is not None:
        if a >= last.until(now) + idle_timeout_s:  # the autoscaler would have removed it: kept for nobody
            return None, "unclaimed", last
        if following is not None and following.job == last.job:
            return last.job, "between", last
        return last.job, "idle", last
    if following is not None and job_starts.get(following.job, float("inf")) <= node.billed_from:
        return following.job, "boot", following
    return None, "unclaimed", following


def _node_spans(node: NodeLife, uses: list[Use], pricer: _Pricer, job_starts: dict[str, float],
                idle_timeout_s: float, now: float) -> list[_Span]:
    """One sweep over the node's cut points: uses start in order, end off a heap (a node may hold thousands)."""
    by_start = sorted(uses, key=lambda use: use.start)
    active: list[tuple[float, int, Use]] = []  # heap of (until, order, use)
    started = 0
    last: Use | None = None
    spans: list[_Span] = []
    for a, b in itertools.pairwise(_cuts(node, uses, pricer, idle_timeout_s, now)):
        while started < len(by_start) and by_start[started].start <= a:
            use = by_start[started]
            heapq.heappush(active, (use.until(now), started, use))
            started += 1
        while active and active[0][0] <= a:  # ended by `a`: the latest to end is the last user so far
            ended = heapq.heappop(active)[2]
            if last is None or ended.until(now) >= last.until(now):
                last = ended
        if b <= a:
            continue
        price = pricer.price(node, a)
        if active:  # every cut is a use's start or end, so whoever is active at `a` holds the node until `b`
            holding = [use for _, _, use in active]
            shares = [use.share(node) for use in holding]
            spans += [_Span(use.job, "busy", use, a, b, share / sum(shares), price)
                      for use, share in zip(holding, shares)]
        else:
            following = by_start[started] if started < len(by_start) else None
            job, kind, use = _idle_owner(a, last, following, node, job_starts, idle_timeout_s, now)
            spans.append(_Span(job, kind, use, a, b, price=price))
    return _merged(spans)


def _merged(spans: list[_Span]) -> list[_Span]:
    """Adjacent stretches of one use, kind and share as one (a node's cuts are many; its rows are few)."""
    merged: list[_Span] = []
    for span in spans:
        previous = next((p for p in reversed(merged[-4:]) if p.end == span.start and p.job == span.job
                         and p.kind == span.kind and p.use is span.use and p.fraction == span.fraction
                         and p.price == span.price), None)
        if previous is not None:
            previous.end = span.end
        else:
            merged.append(span)
    return merged


def _priced(node: NodeLife, span: _Span) -> BilledSpan:
    seconds, price = (span.end - span.start) * span.fraction, span.price
    use = span.use
    return BilledSpan(job=span.job, node=node.node, group=node.group, kind=span.kind,
                      stage=use.stage if use else None, expert=use.expert if use else None,
                      round=use.round if use else None, start=span.start, end=span.end, seconds=seconds,
                      price_per_hour=price, usd=seconds / 3600.0 * price, simulated=node.simulated)


def attribute(nodes: Iterable[NodeLife], uses: Iterable[Use], resources: ResourcesConfig, now: float,
              job_starts: dict[str, float] | None = None) -> Bill:
    """Every second of every node in `nodes`, priced and given to a job (or to nobody) by the module's rule.

    `job_starts`: when each job started (a job whose start is unknown never pays for a node's boot). Uses on
    nodes not in `nodes` (the head, a node Ray no longer lists) are not billed."""
    pricer = _Pricer(resources)
    by_node: dict[str, list[Use]] = defaultdict(list)
    for use in uses:
        by_node[use.node].append(use)
    spans: list[BilledSpan] = []
    for node in nodes:
        node_uses = [u for u in by_node.get(node.node, []) if u.until(now) > u.start]
        for span in _node_spans(node, node_uses, pricer, job_starts or {}, resources.idle_timeout(node.group), now):
            spans.append(_priced(node, span))
    return Bill(spans)


def accrued_usd(spans: Iterable[BilledSpan], since: float = float("-inf"), until: float = float("inf")) -> float:
    """The dollars of `spans` accrued between `since` and `until` (a span across either counts in proportion)."""
    total = 0.0
    for span in spans:
        a, b = max(span.start, since), min(span.end, until)
        if b > a:
            total += span.usd * (b - a) / (span.end - span.start)
        elif span.start == span.end and since <= span.start <= until:
            total += span.usd
    return total


def summarize(spans: Iterable[BilledSpan]) -> list[dict]:
    """A job's spans as rows by (stage, expert, group): seconds and dollars by kind, and in all."""
    rows: dict[tuple, dict] = {}
    for span in spans:
        key = (span.stage, span.expert, span.group)
        row = rows.setdefault(key, {"stage": span.stage, "expert": span.expert, "group": span.group,
                                    "seconds": 0.0, "usd": 0.0, "simulated": False,
                                    **{f"{kind}_seconds": 0.0 for kind in KINDS}, "nodes": set()})
        row["seconds"] += span.seconds
        row["usd"] += span.usd
        row[f"{span.kind}_seconds"] += span.seconds
        row["simulated"] = row["simulated"] or span.simulated
        row["nodes"].add(span.node)
    return [{**row, "nodes": sorted(row["nodes"])} for row in rows.values()]


__all__ = ["GROUP_LABEL", "KINDS", "MARKET_LABEL", "Bill", "BilledSpan", "NodeLife", "Use", "accrued_usd",
           "attribute", "price_group", "summarize"]
