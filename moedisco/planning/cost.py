"""What a job costs: one priced row per stage (and expert), the ledger in `OUTPUT/cost.json`, and the FLOP model.

    ledger = CostLedger(OUTPUT / "cost.json", spec.resources)
    ledger.record("submodel", tier=spec.resources.submodel_tier, seconds=812.4, expert=0, device="cpu")
    ledger.summary()["total_usd"]

`CostRow` is the one row type (the service stores and serves it) and `price_row` the one place dollars are computed,
for finished and running stages alike. Submodels each run on their own device, so their rows add up (the paper's
S-cost). A row run on another device than the tier's accelerator (a CPU standing in for an RTX 4090) says
`simulated: true`; a row also says what of its dollars paid for steps trained twice after a failure or preemption
(`lost_steps`, `lost_usd`).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field

from moedisco.config.resources import ResourcesConfig, TierConfig
from moedisco.io.atomic import write_atomically


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


class CostLedger:
    def __init__(self, path: Path, resources: ResourcesConfig):
        self.path, self.resources = Path(path), resources
        saved = json.loads(self.path.read_text())["stages"] if self.path.is_file() else []
        self.rows: list[CostRow] = [CostRow.model_validate(row) for row in saved]

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
                "total_usd": self.total_usd(), "lost_usd": sum(r.lost_usd for r in self.rows), "simulated": any(r.simulated for r in self.rows),
                "prices_per_hour": dict(self.resources.prices)}

    def _save(self) -> None:
        write_atomically(self.path, json.dumps(self.summary(), indent=2))


def flop_cost_usd(active_params: int, tokens: int, peak_tflops: float, utilisation: float, price: float) -> dict:
    """FLOP-based cost model: training FLOPs ~ 6 x active parameters x tokens, at `utilisation` of the peak."""
    flops = 6.0 * active_params * tokens
    seconds = flops / (peak_tflops * 1e12 * utilisation)
    return {"flops": flops, "seconds": seconds, "usd": seconds / 3600.0 * price}
