"""What a job costs, in two views, kept in the ledger `OUTPUT/cost.json`; and the FLOP model (`flop_cost_usd`).

    ledger = CostLedger(OUTPUT / "cost.json", spec.resources)
    ledger.record("submodel", tier=spec.resources.submodel_tier, seconds=812.4, expert=0, device="cpu")
    ledger.add_uses(summary["node_uses"]); ledger.set_nodes(executor.node_lives())
    ledger.summary()["total_usd"], ledger.summary()["billed"]["total_usd"]

**compute**: one priced row per stage (and expert), the device-hours of its work at its tier's price.
**billed**: what the cloud charges: the node-seconds of the worker nodes the job's work held (boot, waits and idle
time before scale-down included), at the price of each node's group (`moedisco.planning.billing`). It needs the
nodes' lives and the job's uses of them, which the Ray runner records; a job with none (the local runner, one
machine) is billed its compute rows (`basis: compute`). Budgets spend the billed view. The ledger knows only this
job's work: on a cluster shared with other jobs, the service, which sees them all, bills each its share.

`CostRow` is the one row type (the service stores and serves it) and `price_row` the one place dollars are computed,
for finished and running stages alike. Submodels each run on their own device, so their rows add up (the paper's
S-cost). A row run on another device than the tier's accelerator (a CPU standing in for an RTX 4090) says
`simulated: true`; a row also says what of its dollars paid for steps trained twice after a failure or preemption
(`lost_steps`, `lost_usd`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from pydantic import BaseModel, Field

from moedisco.config.resources import DeviceSpec, ResourcesConfig, TierConfig
from moedisco.io.atomic import write_atomically
from moedisco.planning.billing import KINDS, BilledSpan, NodeLife, Use, attribute, summarize

THIS_JOB = "job"  # the ledger's name for its own job among the uses it bills


class LostWork(BaseModel):
    """Work a trainer did twice because it was restarted (failures, preemptions), and its preemptions."""

    steps: int = 0
    usd: float = 0.0
    preemptions: int = 0


def lost_work(usd: float, work: dict | None) -> LostWork:
    """From a training summary's `lost_steps`, `steps_run`, `preemptions` (the Ray runner's; none: nothing lost
    that the runner saw) and the `usd` its run cost."""
    if not work or not work.get("steps_run"):
        return LostWork(preemptions=(work or {}).get("preemptions", 0))
    return LostWork(steps=work["lost_steps"], usd=usd * work["lost_steps"] / work["steps_run"],
                    preemptions=work["preemptions"])


class CostRow(BaseModel):
    stage: str
    expert: int | None
    tier: str = Field(description="The tier's node label.")
    device_type: str
    num_devices: int
    seconds: float
    device_hours: float
    price_per_hour: float
    usd: float
    simulated: bool = Field(description="True when the device was not the tier's accelerator (priced wall time).")
    device: str | None = Field(description="The torch device that ran it (unknown while it runs).")
    node: str | None
    rounds: dict[str, float] | None = Field(
        None, description="Seconds per synchronisation round, for a stage run in rounds (`seconds` is their sum).")
    lost_steps: int = Field(0, description="Steps trained twice: redone after a failure or preemption restarted it.")
    lost_usd: float = Field(0.0, description="The part of `usd` that paid for `lost_steps`.")
    preemptions: int = Field(0, description="Times it was checkpointed on a preemption notice and started again.")
    lost_rounds: dict[str, LostWork] | None = Field(
        None, description="The lost work per synchronisation round, for a stage run in rounds (the totals' parts).")

    @property
    def key(self) -> tuple[str, int | None]:
        return self.stage, self.expert

    def to_json(self) -> dict:
        return self.model_dump(mode="json", exclude={name for name in ("rounds", "lost_rounds")
                                                     if getattr(self, name) is None})


def price_row(stage: str, tier: TierConfig, prices: dict[str, float], seconds: float, device: str | None = None,
              expert: int | None = None, node: str | None = None, num_devices: int | None = None,
              rounds: dict[str, float] | None = None) -> CostRow:
    """`seconds` on `num_devices` (default: the tier's) devices of the tier, at the tier's price per device-hour."""
    price = prices.get(tier.device_type, 0.0)
    devices = num_devices or tier.num_devices
    hours = devices * seconds / 3600.0
    return CostRow(stage=stage, expert=expert, tier=tier.label, device_type=tier.device_type, num_devices=devices,
                   seconds=round(seconds, 3), device_hours=hours, price_per_hour=price, usd=hours * price,
                   simulated=device is not None and not device.startswith("cuda"), device=device, node=node,
                   rounds=rounds)


def billed_view(spans: list, compute_usd: float, simulated: bool) -> dict:
    """The billed view of one job's spans (`summarize`'s rows, totals by kind); with no spans, its compute rows'
    total (`basis: compute`: no node was recorded)."""
    if not spans:
        return {"basis": "compute", "total_usd": compute_usd, "rows": [], "seconds": 0.0,
                "seconds_by_kind": {}, "usd_by_kind": {}, "usd_by_group": {}, "simulated": simulated}
    rows = summarize(spans)
    by_group: dict[str, float] = {}
    for row in rows:
        by_group[row["group"]] = by_group.get(row["group"], 0.0) + row["usd"]
    return {"basis": "nodes", "total_usd": sum(span.usd for span in spans), "rows": rows,
            "seconds": sum(span.seconds for span in spans),
            "seconds_by_kind": {kind: sum(s.seconds for s in spans if s.kind == kind) for kind in KINDS},
            "usd_by_kind": {kind: sum(s.usd for s in spans if s.kind == kind) for kind in KINDS},
            "usd_by_group": by_group, "simulated": any(span.simulated for span in spans)}


class CostLedger:
    def __init__(self, path: Path, resources: ResourcesConfig):
        self.path, self.resources = Path(path), resources
        saved = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.rows: list[CostRow] = [CostRow.model_validate(row) for row in saved.get("stages", [])]
        usage = saved.get("usage", {})
        self.started_at: float | None = usage.get("started_at")
        self.nodes: dict[str, NodeLife] = {n["node"]: NodeLife(**n) for n in usage.get("nodes", [])}
        self.uses: dict[tuple, Use] = {}
        for use in usage.get("uses", []):
            self._add_use(Use(**use))

    # --- the billed view's records ------------------------------------------------------------------------------

    def begin(self, now: float | None = None) -> None:
        """The job starts (its first run): nodes asked for from now on may be billed for their boot."""
        if self.started_at is None:
            self.started_at = now if now is not None else time.time()
            self._save()

    def add_uses(self, uses: list[dict], save: bool = True) -> None:
        """Node uses (`moedisco.job.events.NodeUse` as JSON: node, pid, start, end, resources, stage, expert,
        round); one already recorded (same node, start, stage, expert and round) is replaced. `save`: rewrite
        cost.json now (a use reported as it happens waits for the stage's end)."""
        for use in uses:
            self._add_use(Use(job=THIS_JOB, node=use["node"], start=use["start"], end=use.get("end"),
                              stage=use.get("stage"), expert=use.get("expert"), round=use.get("round"),
                              resources=use.get("resources") or {}))
        if uses and save:
            self._save()

    def _add_use(self, use: Use) -> None:
        self.uses[(use.node, use.start, use.stage, use.expert, use.round)] = use

    def set_nodes(self, lives: list[NodeLife]) -> None:
        """The cluster's worker nodes as last seen; nodes seen before and gone from the list keep their record."""
        changed = False
        for life in lives:
            if self.nodes.get(life.node) != life:
                self.nodes[life.node], changed = life, True
        if changed:
            self._save()

    def billed_spans(self, now: float | None = None) -> list[BilledSpan]:
        """This job's stretches of node time, priced (`moedisco.planning.billing`), up to `now`."""
        now = now if now is not None else time.time()
        used = {use.node for use in self.uses.values()}
        bill = attribute([node for node in self.nodes.values() if node.node in used], self.uses.values(),
                         self.resources, now, job_starts={THIS_JOB: now if self.started_at is None else self.started_at})
        return bill.for_job(THIS_JOB)

    def billed(self, now: float | None = None) -> dict:
        """This job's billed view (`billed_view`) of the nodes its work used, up to `now`."""
        return billed_view(self.billed_spans(now), self.total_usd(), any(r.simulated for r in self.rows))

    def spent_usd(self) -> float:
        """What budgets count as spent: the billed total."""
        return self.billed()["total_usd"]

    def record(self, stage: str, tier: TierConfig, seconds: float, device: str, expert: int | None = None,
               node: str | None = None, num_devices: int | None = None, round_index: int | None = None,
               work: dict | None = None) -> CostRow:
        """Add (or, on a resumed run, replace) the row of `stage`/`expert` and rewrite cost.json; `work`: the
        training summary's restart accounting (`lost_work`).

        A stage that runs in synchronisation rounds keeps one row whose `seconds` add up its rounds (`rounds`:
        seconds per round); recording a round again replaces that round's part, and its lost work.
        """
        lost = lost_work(price_row(stage, tier, self.resources.prices, seconds, num_devices=num_devices).usd, work)
        rounds = lost_rounds = None
        if round_index is not None:
            previous = next((r for r in self.rows if r.key == (stage, expert)), None)
            rounds = {**((previous and previous.rounds) or {}), str(round_index): round(seconds, 3)}
            lost_rounds = {**((previous and previous.lost_rounds) or {}), str(round_index): lost}
            seconds = sum(rounds.values())
            lost = LostWork(**{field: sum(getattr(part, field) for part in lost_rounds.values())
                               for field in LostWork.model_fields})
        row = price_row(stage, tier, self.resources.prices, seconds, device=device, expert=expert, node=node,
                        num_devices=num_devices, rounds=rounds).model_copy(update={
                            "lost_steps": lost.steps, "lost_usd": lost.usd, "preemptions": lost.preemptions,
                            "lost_rounds": lost_rounds})
        self.rows = [r for r in self.rows if r.key != row.key] + [row]
        self._save()
        return row

    def last_usd(self, stage: str) -> float:
        """What the most recently recorded run of `stage` cost: one round of it when it runs in rounds."""
        rows = [row for row in self.rows if row.stage == stage]
        if not rows:
            return 0.0
        row = rows[-1]
        if not row.rounds or row.seconds <= 0:
            return row.usd
        last_round = max(row.rounds, key=int)
        return row.usd * row.rounds[last_round] / row.seconds

    def total_usd(self) -> float:
        return sum(r.usd for r in self.rows)

    def summary(self) -> dict:
        by_tier: dict[str, float] = {}
        for row in self.rows:
            by_tier[row.tier] = by_tier.get(row.tier, 0.0) + row.usd
        return {"stages": [row.to_json() for row in self.rows], "by_tier_usd": by_tier,
                "total_usd": self.total_usd(), "lost_usd": sum(r.lost_usd for r in self.rows),
                "simulated": any(r.simulated for r in self.rows), "prices_per_hour": dict(self.resources.prices),
                "billed": self.billed(),
                "usage": {"started_at": self.started_at, "nodes": [asdict(n) for n in self.nodes.values()],
                          "uses": [asdict(u) for u in self.uses.values()]}}

    def _save(self) -> None:
        write_atomically(self.path, json.dumps(self.summary(), indent=2))


# Per parameter and token: 2 FLOPs in the forward, 4 in the backward; activation checkpointing runs the forward
# once more in the backward (every layer's, to rebuild the activations it did not keep).
TRAINING_FLOPS_PER_PARAM_TOKEN = 6.0
RECOMPUTED_FLOPS_PER_PARAM_TOKEN = 8.0


def flop_cost_usd(active_params: int, tokens: int, device: DeviceSpec, price: float, recompute: bool = False) -> dict:
    """The FLOP cost model: training FLOPs = 6 x active parameters x tokens (8 with `recompute`, activation
    checkpointing), run at `device.efficiency` of its `bf16_tflops` peak, at `price` dollars per device-hour.
    `seconds` are device-seconds."""
    per_param_token = RECOMPUTED_FLOPS_PER_PARAM_TOKEN if recompute else TRAINING_FLOPS_PER_PARAM_TOKEN
    flops = per_param_token * active_params * tokens
    seconds = flops / (device.bf16_tflops * 1e12 * device.efficiency)
    return {"flops": flops, "seconds": seconds, "usd": seconds / 3600.0 * price}
