"""`OUTPUT/report.png`: held-out loss per stage (paper Fig. 4) and dollars per stage (paper Table 3), for one job.

    write_report(OUTPUT / "metrics.jsonl", OUTPUT / "cost.json", OUTPUT / "report.png", title="tiny")
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from moedisco.metrics import read_metrics  # noqa: E402
from moedisco.stages import STAGE  # noqa: E402


def loss_curves(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Label -> (steps, held-out losses); submodels are one curve each, the merge is the fine-tune's step 0."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        if record.get("eval_loss") is None:
            continue
        stage = record["stage"]
        if stage == "merge":
            label = "finetune"
        elif STAGE[stage].trained:
            label = stage if record.get("expert") is None else f"{stage} {record['expert']}"
        else:
            continue
        steps, losses = curves.setdefault(label, ([], []))
        steps.append(record["step"])
        losses.append(record["eval_loss"])
    return curves


def cost_bars(cost_path: Path) -> dict[str, float]:
    if not cost_path.is_file():
        return {}
    bars: dict[str, float] = {}
    for row in json.loads(cost_path.read_text())["stages"]:
        bars[row["stage"]] = bars.get(row["stage"], 0.0) + row["usd"]
    return bars


def lost_bars(cost_path: Path) -> dict[str, float]:
    """Per stage, the dollars that paid for steps trained twice (`CostRow.lost_usd`): failures and preemptions."""
    if not cost_path.is_file():
        return {}
    bars: dict[str, float] = {}
    for row in json.loads(cost_path.read_text())["stages"]:
        bars[row["stage"]] = bars.get(row["stage"], 0.0) + row.get("lost_usd", 0.0)
    return bars


def _plot_curves(ax, curves: dict, labels: tuple[str, ...], title: str) -> None:
    for label, (steps, losses) in sorted(curves.items()):
        if label.split(" ")[0] in labels:
            ax.plot(steps, losses, marker="o", markersize=3, label=label)
    ax.set(xlabel="step", ylabel="held-out loss", title=title)
    if ax.get_lines():
        ax.legend(fontsize=8)


def write_report(metrics_path: Path, cost_path: Path, out: Path, title: str = "") -> Path:
    curves = loss_curves(read_metrics(metrics_path))
    bars = cost_bars(cost_path)
    fig, (ax_cheap, ax_dear, ax_cost) = plt.subplots(1, 3, figsize=(15, 4.5))
    _plot_curves(ax_cheap, curves, ("warmup", "submodel"), f"{title}: cheap tier (warm-up, submodels)")
    _plot_curves(ax_dear, curves, ("finetune", "full_parameter"), "expensive tier (step 0 = merged model)")
    ax_cost.bar(list(bars), list(bars.values()), color="tab:green")
    lost = lost_bars(cost_path)
    if any(lost.values()):  # the part of each bar that paid for work redone after restarts
        ax_cost.bar(list(lost), list(lost.values()), color="tab:red", label="lost to restarts")
        ax_cost.legend(fontsize=8)
    ax_cost.set(ylabel="USD", title=f"cost per stage (total ${sum(bars.values()):.4f}, "
                f"lost ${sum(lost.values()):.4f})")
    ax_cost.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
