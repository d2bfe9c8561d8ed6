"""The cost ledger: device-hours x price per device type, per stage, in `OUTPUT/cost.json`.

    ledger = CostLedger(OUTPUT / "cost.json", spec.resources)
    ledger.record("submodel", tier=spec.resources.submodel_tier, seconds=812.4, expert=0, device="cpu")
    ledger.summary()["total_usd"]

Submodels each run on their own device, so their rows add up (the paper's S-cost). When the device that ran a
stage is not the tier's accelerator (a CPU standing in for an RTX 4090 on a laptop), the row says
`simulated: true`: the dollars are what that wall time would cost at the tier's price, not what was spent.
"""

from __future__ import annotations

import json
from pathlib import Path

from moedisco.config import ResourcesConfig, TierConfig


class CostLedger:
    def __init__(self, path: Path, resources: ResourcesConfig):
        self.path, self.resources = Path(path), resources
        self.rows: list[dict] = json.loads(self.path.read_text())["stages"] if self.path.is_file() else []

    def record(self, stage: str, tier: TierConfig, seconds: float, device: str, expert: int | None = None,
               node: str | None = None, num_devices: int | None = None, round_index: int | None = None) -> dict:
        """Add (or, on a resumed run, replace) the row of `stage`/`expert` and rewrite cost.json.

        A stage that runs in synchronisation rounds keeps one row whose `seconds` add up its rounds (`rounds`:
        seconds per round); recording a round again replaces that round's part.
        """
        rounds = None
        if round_index is not None:
            previous = next((r for r in self.rows if (r["stage"], r["expert"]) == (stage, expert)), {})
            rounds = {**previous.get("rounds", {}), str(round_index): round(seconds, 3)}
            seconds = sum(rounds.values())
        price = self.resources.prices[tier.device_type]
        devices = num_devices or tier.num_devices
        row = {
            "stage": stage, "expert": expert, "tier": tier.label, "device_type": tier.device_type,
            "num_devices": devices, "seconds": round(seconds, 3), "device_hours": devices * seconds / 3600.0,
            "price_per_hour": price, "usd": devices * seconds / 3600.0 * price,
            "simulated": not device.startswith("cuda"), "device": device, "node": node,
            **({"rounds": rounds} if rounds is not None else {}),
        }
        self.rows = [r for r in self.rows if (r["stage"], r["expert"]) != (stage, expert)] + [row]
        self._save()
        return row

    def last_usd(self, stage: str) -> float:
        """What the most recently recorded run of `stage` cost: one round of it when it runs in rounds."""
        rows = [row for row in self.rows if row["stage"] == stage]
        if not rows:
            return 0.0
        row = rows[-1]
        if not row.get("rounds") or row["seconds"] <= 0:
            return row["usd"]
        last_round = max(row["rounds"], key=int)
        return row["usd"] * row["rounds"][last_round] / row["seconds"]

    def total_usd(self) -> float:
        return sum(r["usd"] for r in self.rows)

    def summary(self) -> dict:
        by_tier: dict[str, float] = {}
        for row in self.rows:
            by_tier[row["tier"]] = by_tier.get(row["tier"], 0.0) + row["usd"]
        return {"stages": self.rows, "by_tier_usd": by_tier, "total_usd": self.total_usd(),
                "simulated": any(r["simulated"] for r in self.rows),
                "prices_per_hour": dict(self.resources.prices)}

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.summary(), indent=2))
        tmp.replace(self.path)


def flop_cost_usd(active_params: int, tokens: int, peak_tflops: float, utilisation: float, price: float) -> dict:
    """FLOP-based cost model: training FLOPs ~ 6 x active parameters x tokens, at `utilisation` of the peak."""
    flops = 6.0 * active_params * tokens
    seconds = flops / (peak_tflops * 1e12 * utilisation)
    return {"flops": flops, "seconds": seconds, "usd": seconds / 3600.0 * price}
