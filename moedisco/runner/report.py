"""`OUTPUT/report.png`: held-out loss against cumulative dollars, billed and compute, for the job and its baseline
(paper Figs. 2/4), held-out loss per stage, and dollars per stage in both views (paper Table 3).

    write_report(OUTPUT / "metrics.jsonl", OUTPUT / "cost.json", OUTPUT / "report.png", title="tiny",
                 baseline=BASELINE_OUTPUT)             # a full-parameter job's folder, drawn on the same axes
    records = read_metrics(OUTPUT / "metrics.jsonl")
    compute = dollar_curve(records, OUTPUT / "cost.json")                 # [(usd, loss, tier)]
    billed = billed_curve(records, billed_spans(OUTPUT / "cost.json"))    # the same in billed dollars

The two views of `moedisco.planning.cost`. **compute**: each stage's device-hours at its tier's price, spread over
the stage's steps by its training seconds so far. **billed**: what the cloud charges, the node-seconds the job's
work held at its node group's price; a point's billed dollars are those of the job's billed spans before the wall
time its metrics line was written at (`time`), a span counted pro rata for its part before then. Each curve ends at
its job's total in its view: the final model cost the whole job (the evaluate stage, the idle time before
scale-down). A job with no billed spans (the local runner on one machine, billed its compute total; a cost.json
written before the billed view) is drawn in the compute view only, with a note. A baseline is drawn in the same
views as the job, so the two are compared like with like.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from moedisco.config.resources import ResourcesConfig  # noqa: E402
from moedisco.job.metrics import read_metrics  # noqa: E402
from moedisco.job.registry import STAGE, STAGES, pipeline_order  # noqa: E402
from moedisco.planning.billing import BilledSpan, accrued_usd  # noqa: E402
from moedisco.planning.cost import CostLedger, billed_view  # noqa: E402

Point = tuple[float, float, str]  # (cumulative USD, held-out loss, tier)
VIEWS = {"billed": "billed (node-hours at group prices)", "compute": "compute (device-hours at tier prices)"}


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


def read_cost(cost_path: Path) -> dict:
    """cost.json as written (`CostLedger.summary`); {} before its first stage."""
    return json.loads(cost_path.read_text()) if cost_path.is_file() else {}


def _evaluated_steps(records: list[dict]) -> list[tuple[str, list[dict]]]:
    """(stage, its records of one step: one per expert) of each evaluated step of the trained stages, in pipeline
    and step order; a step logged again after a resume keeps its latest record."""
    steps = []
    for stage in (stage.name for stage in STAGES if stage.trained):
        by_step: dict[int, dict] = {}
        for r in records:
            if r["stage"] == stage and r.get("eval_loss") is not None:
                by_step.setdefault(r["step"], {})[r.get("expert")] = r
        steps += [(stage, list(experts.values())) for _, experts in sorted(by_step.items())]
    return steps


def _mean_loss(experts: list[dict]) -> float:
    return sum(r["eval_loss"] for r in experts) / len(experts)


def _to_total(points: list[Point], total_usd: float) -> list[Point]:
    """The curve, then its last loss at the job's total: what the final model cost in all."""
    if points and total_usd > points[-1][0]:
        return [*points, (total_usd, points[-1][1], points[-1][2])]
    return points


def dollar_curve(records: list[dict], cost_path: Path) -> list[Point]:
    """(cumulative compute USD, held-out loss, tier) along the job: the warm-up, the submodels (mean loss over
    experts at each step, dollars summed over experts), the merged model, the fine-tune; or the full-parameter run."""
    rows = read_cost(cost_path).get("stages", [])
    rates = {row["stage"]: row["usd"] / row["seconds"] for row in rows if row["seconds"] > 0}
    # Everything before the fine-tune: the set-up work (on the CPU tier and the cheap one) and the cheap phase.
    cheap = tuple(stage.name for stage in STAGES if stage.tier != "finetune_tier")
    spent = sum(row["usd"] for row in rows if row["stage"] in cheap and STAGE[row["stage"]].setup)
    points: list[Point] = []
    previous = None
    for stage, experts in _evaluated_steps(records):
        if stage != previous:  # a stage's dollars start where the previous one's ended; the fine-tune after all cheap
            spent = sum(row["usd"] for row in rows if row["stage"] in cheap) if stage == "finetune" else (
                points[-1][0] if points else spent)
            previous = stage
        usd = spent + sum(rates.get(stage, 0.0) * r.get("seconds", 0.0) for r in experts)
        points.append((usd, _mean_loss(experts), STAGE[stage].tier))
    return _to_total(points, sum(row["usd"] for row in rows))


def _spec_resources(spec_path: Path) -> ResourcesConfig | None:
    try:
        raw = yaml.safe_load(spec_path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    try:
        return ResourcesConfig.model_validate((raw.get("resources") if isinstance(raw, dict) else None) or {})
    except ValidationError:  # a spec this version cannot read
        return None


def billed_spans(cost_path: Path, resources: ResourcesConfig | None = None,
                 now: float | None = None) -> list[BilledSpan] | None:
    """The job's billed spans up to `now` (`CostLedger.billed_spans` on cost.json's `usage`), priced by `resources`
    (default: the job's spec.yaml beside cost.json); None when there are none (`no_billed_reason`)."""
    if not read_cost(cost_path).get("usage", {}).get("uses"):
        return None
    resources = resources or _spec_resources(cost_path.parent / "spec.yaml")
    if resources is None:
        return None
    return CostLedger(cost_path, resources).billed_spans(now if now is not None else time.time()) or None


def no_billed_reason(cost_path: Path) -> str:
    """Why a job has no billed spans to draw."""
    cost = read_cost(cost_path)
    if not cost:
        return "no cost recorded yet"
    if "billed" not in cost:
        return "no billed view (cost.json of an older moedisco): compute only"
    if cost["billed"].get("basis") == "compute":
        return "no node was recorded (one machine): the billed total is the compute total"
    return "its nodes cannot be priced (no readable spec.yaml beside cost.json)"


def billed_curve(records: list[dict], spans: list[BilledSpan]) -> list[Point]:
    """(cumulative billed USD, held-out loss, tier) at the points of `dollar_curve`: the spans' dollars before the
    step was logged (by its last expert; never before an earlier point). Records without `time` are left out."""
    points: list[Point] = []
    known_at = float("-inf")
    for stage, experts in _evaluated_steps(records):
        times = [r["time"] for r in experts if r.get("time") is not None]
        if not times:
            continue
        known_at = max(known_at, *times)
        points.append((accrued_usd(spans, until=known_at), _mean_loss(experts), STAGE[stage].tier))
    return _to_total(points, sum(span.usd for span in spans))


def dollar_views(jobs: dict[str, tuple[list[dict], Path, list[BilledSpan] | None]]
                 ) -> tuple[dict[str, list[Point]], dict[str, list[Point]], list[str]]:
    """Name -> (records, cost.json, billed spans) of each job: the compute curves, the billed curves of the jobs
    with spans, and a note for each job without."""
    compute, billed, notes = {}, {}, []
    for name, (records, cost_path, spans) in jobs.items():
        compute[name] = dollar_curve(records, cost_path)
        if spans:
            billed[name] = billed_curve(records, spans)
        else:
            notes.append(f"{name}: {no_billed_reason(cost_path)}")
    return compute, billed, notes


TIER_STYLE = {"cpu_tier": ("CPU tier", "tab:gray"), "submodel_tier": ("cheap tier", "tab:green"),
              "finetune_tier": ("expensive tier", "tab:red")}


def plot_loss_vs_dollars(ax, curves: dict[str, list[Point]], view: str = "compute", notes: list[str] = ()) -> None:
    """One line per job (solid for the first, dashed after), each tier's segment in its own colour; `view`: the
    dollars' view (`VIEWS`)."""
    for index, (job, points) in enumerate(curves.items()):
        for tier, (tier_name, colour) in TIER_STYLE.items():
            # A segment starts where the previous tier ended, so each job's line stays continuous.
            segment = [p for i, p in enumerate(points)
                       if p[2] == tier or (i + 1 < len(points) and points[i + 1][2] == tier)]
            if segment:
                ax.plot([p[0] for p in segment], [p[1] for p in segment], color=colour, marker=".",
                        linestyle="-" if index == 0 else "--", label=f"{job}: {tier_name}")
    ax.set(xlabel=f"cumulative USD, {VIEWS[view]}", ylabel="held-out loss",
           title=f"held-out loss against dollars: {VIEWS[view]}")
    if ax.get_lines():
        ax.legend(fontsize=8)
    if notes:
        ax.text(0.01, 0.01, "\n".join(notes), transform=ax.transAxes, fontsize=8, va="bottom",
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})


def plot_dollar_views(fig, cell, compute: dict[str, list[Point]], billed: dict[str, list[Point]],
                      notes: list[str]) -> None:
    """In `cell` of `fig` (a GridSpec cell): loss against billed dollars beside loss against compute dollars, on
    shared axes; the compute view alone when no job has billed spans. `notes` go on the first panel."""
    if not billed:
        plot_loss_vs_dollars(fig.add_subplot(cell), compute, "compute", notes)
        return
    inner = cell.subgridspec(1, 2)
    ax_billed = fig.add_subplot(inner[0])
    plot_loss_vs_dollars(ax_billed, billed, "billed", notes)
    plot_loss_vs_dollars(fig.add_subplot(inner[1], sharex=ax_billed, sharey=ax_billed), compute, "compute")


def by_stage(rows: list[dict], field: str = "usd") -> dict[str, float]:
    """Rows (compute or billed) summed by stage; node time of no stage is `other`."""
    sums: dict[str, float] = {}
    for row in rows:
        stage = row["stage"] or "other"
        sums[stage] = sums.get(stage, 0.0) + row.get(field, 0.0)
    return sums


def plot_cost_bars(ax, compute: dict[str, float], lost: dict[str, float], billed: dict[str, float] | None,
                   billed_total: float | None) -> None:
    """Dollars per stage: compute (its part lost to restarts in red) and, beside it, billed when known."""
    stages = sorted({*compute, *(billed or {})}, key=pipeline_order)
    width = 0.4 if billed is not None else 0.8
    offset = -width / 2 if billed is not None else 0.0
    xs = range(len(stages))
    ax.bar([x + offset for x in xs], [compute.get(s, 0.0) for s in stages], width, color="tab:green",
           label=VIEWS["compute"])
    if any(lost.values()):  # the part of each compute bar that paid for work redone after restarts
        ax.bar([x + offset for x in xs], [lost.get(s, 0.0) for s in stages], width, color="tab:red",
               label="lost to restarts")
    if billed is not None:
        ax.bar([x + width / 2 for x in xs], [billed.get(s, 0.0) for s in stages], width, color="tab:blue",
               label=VIEWS["billed"])
    ax.set_xticks(list(xs), stages, rotation=30)
    # "\\$": two dollar signs in one title would be typeset as mathematics between them
    billed_text = f"billed \\${billed_total:.4f} vs " if billed_total is not None else ""
    ax.set(ylabel="USD", title=f"cost per stage: {billed_text}compute \\${sum(compute.values()):.4f}"
           + (f" (lost \\${sum(lost.values()):.4f})" if any(lost.values()) else ""))
    if stages:
        ax.legend(fontsize=8)


KIND_WORDS = {"boot": "boot", "busy": "busy", "between": "waits", "idle": "idle"}  # a job's kinds (never unclaimed)


def billed_line(billed: dict, compute_usd: float) -> str:
    """The two views' totals in one line, and which one budgets count; `billed`: `billed_view`'s dict."""
    if billed["basis"] == "compute":
        return (f"billed ${billed['total_usd']:.5f} = compute: no node was recorded (one machine), so the billed "
                "total is the compute total; budgets (max_cost_usd) count it")
    seconds = billed["seconds"] or 1.0
    shares = ", ".join(f"{word} {100 * billed['seconds_by_kind'].get(kind, 0.0) / seconds:.0f}%"
                       for kind, word in KIND_WORDS.items())
    return (f"billed ${billed['total_usd']:.5f} (node-hours: {shares}) vs compute ${compute_usd:.5f}; "
            "budgets (max_cost_usd) count the billed dollars")


def _plot_curves(ax, curves: dict, labels: tuple[str, ...], title: str) -> None:
    for label, (steps, losses) in sorted(curves.items()):
        if label.split(" ")[0] in labels:
            ax.plot(steps, losses, marker="o", markersize=3, label=label)
    ax.set(xlabel="step", ylabel="held-out loss", title=title)
    if ax.get_lines():
        ax.legend(fontsize=8)


def write_report(metrics_path: Path, cost_path: Path, out: Path, title: str = "", baseline: Path | None = None,
                 resources: ResourcesConfig | None = None, now: float | None = None) -> Path:
    """`baseline`: a full-parameter job's folder, whose curves join this job's; `resources`: the job's prices (default:
    its spec.yaml beside cost.json); `now`: the end of the billed spans of nodes still alive (default: now)."""
    records = read_metrics(metrics_path)
    spans = billed_spans(cost_path, resources, now)
    jobs = {title or "job": (records, cost_path, spans)}
    if baseline is not None:
        jobs["baseline"] = (read_metrics(baseline / "metrics.jsonl"), baseline / "cost.json",
                            billed_spans(baseline / "cost.json", now=now))
    compute_rows = read_cost(cost_path).get("stages", [])
    billed = billed_view(spans, 0.0, False) if spans else None
    fig = plt.figure(figsize=(15, 9))
    grid = fig.add_gridspec(2, 3)
    plot_dollar_views(fig, grid[0, :], *dollar_views(jobs))
    curves = loss_curves(records)
    _plot_curves(fig.add_subplot(grid[1, 0]), curves, ("warmup", "submodel"), f"{title}: cheap tier (warm-up, submodels)")
    _plot_curves(fig.add_subplot(grid[1, 1]), curves, ("finetune", "full_parameter"),
                 "expensive tier (step 0 = merged model)")
    plot_cost_bars(fig.add_subplot(grid[1, 2]), by_stage(compute_rows), by_stage(compute_rows, "lost_usd"),
                   by_stage(billed["rows"]) if billed else None, billed["total_usd"] if billed else None)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
