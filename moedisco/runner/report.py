"""`OUTPUT/report.png`: held-out loss against cumulative dollars for the job and its baseline (paper Figs. 2/4),
held-out loss per stage, and dollars per stage (paper Table 3).

    write_report(OUTPUT / "metrics.jsonl", OUTPUT / "cost.json", OUTPUT / "report.png", title="tiny",
                 baseline=BASELINE_OUTPUT)             # a full-parameter job's folder, drawn on the same axes
    points = dollar_curve(read_metrics(OUTPUT / "metrics.jsonl"), OUTPUT / "cost.json")  # [(usd, loss, tier)]

Dollars are the cost ledger's (OUTPUT/cost.json: each stage's wall time at its tier's price, simulated when a CPU
stands in for the tier's device), spread over each stage's steps by its training seconds so far. Both curves use
that one pricing, so the job and its baseline are compared like with like.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from moedisco.job.metrics import read_metrics  # noqa: E402
from moedisco.job.registry import STAGE, STAGES  # noqa: E402


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


def _rates(cost_path: Path) -> dict[str, float]:
    """Dollars per training second of each stage (the ledger's price of its tier and devices)."""
    rows = json.loads(cost_path.read_text())["stages"] if cost_path.is_file() else []
    return {row["stage"]: row["usd"] / row["seconds"] for row in rows if row["seconds"] > 0}


def _stage_usd(cost_path: Path, stages: tuple[str, ...]) -> float:
    rows = json.loads(cost_path.read_text())["stages"] if cost_path.is_file() else []
    return sum(row["usd"] for row in rows if row["stage"] in stages)


def dollar_curve(records: list[dict], cost_path: Path) -> list[tuple[float, float, str]]:
    """(cumulative USD, held-out loss, tier) along the job: the warm-up, the submodels (mean loss over experts at
    each step, dollars summed over experts), the merged model, the fine-tune; or the full-parameter run."""
    rates, points = _rates(cost_path), []
    cheap = tuple(stage.name for stage in STAGES if stage.tier == "submodel_tier")
    spent = _stage_usd(cost_path, tuple(name for name in cheap if STAGE[name].setup))  # before any training
    for stage in (stage.name for stage in STAGES if stage.trained):
        by_step: dict[int, dict] = {}
        for r in records:
            if r["stage"] == stage and r.get("eval_loss") is not None:
                by_step.setdefault(r["step"], {})[r.get("expert")] = r
        if stage == "finetune":
            spent = _stage_usd(cost_path, cheap)
        for step, experts in sorted(by_step.items()):
            usd = spent + sum(rates.get(stage, 0.0) * r.get("seconds", 0.0) for r in experts.values())
            loss = sum(r["eval_loss"] for r in experts.values()) / len(experts)
            points.append((usd, loss, STAGE[stage].tier))
        if by_step:
            spent = points[-1][0]
    return points


TIER_STYLE = {"submodel_tier": ("cheap tier", "tab:green"), "finetune_tier": ("expensive tier", "tab:red")}


def plot_loss_vs_dollars(ax, curves: dict[str, list[tuple[float, float, str]]]) -> None:
    """One line per job (solid for the first, dashed after), each tier's segment in its own colour."""
    for index, (job, points) in enumerate(curves.items()):
        for tier, (tier_name, colour) in TIER_STYLE.items():
            # A segment starts where the previous tier ended, so each job's line stays continuous.
            segment = [p for i, p in enumerate(points)
                       if p[2] == tier or (i + 1 < len(points) and points[i + 1][2] == tier)]
            if segment:
                ax.plot([p[0] for p in segment], [p[1] for p in segment], color=colour, marker=".",
                        linestyle="-" if index == 0 else "--", label=f"{job}: {tier_name}")
    ax.set(xlabel="cumulative USD (wall time at tier prices)", ylabel="held-out loss",
           title="held-out loss against dollars")
    if ax.get_lines():
        ax.legend(fontsize=8)


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


def write_report(metrics_path: Path, cost_path: Path, out: Path, title: str = "", baseline: Path | None = None) -> Path:
    """`baseline`: a full-parameter job's folder, whose curve joins this job's in the loss-against-dollars plot."""
    records = read_metrics(metrics_path)
    curves = loss_curves(records)
    bars = cost_bars(cost_path)
    by_job = {title or "job": dollar_curve(records, cost_path)}
    if baseline is not None:
        by_job["baseline"] = dollar_curve(read_metrics(baseline / "metrics.jsonl"), baseline / "cost.json")
    fig = plt.figure(figsize=(15, 9))
    plot_loss_vs_dollars(fig.add_subplot(2, 1, 1), by_job)
    ax_cheap, ax_dear, ax_cost = (fig.add_subplot(2, 3, 4 + i) for i in range(3))
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
