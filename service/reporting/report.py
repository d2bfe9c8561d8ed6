"""The HTML report of one job: held-out loss against billed and compute dollars (with its baseline), loss curves per
training stage, cost bars and tables in both views, and the downstream scores of its evaluate stage, as inline PNG
images and tables.

    html = render_report(job, stages, records, cost)     # GET /v1/jobs/{id}/report
    html = render_report(job, stages, records, cost, spans=bill_inputs(store, job).spans(now))   # the service's split

The billed curve is drawn from the job's billed spans: the service's when given (`service.store.billing`, which
splits a node with the other jobs that used it, as the cost view does), else its runner's ledger in the job folder
(`moedisco.runner.report.billed_spans`, priced by the job's stored spec), which knows only this job's uses.

Images are embedded as data: URIs, so the page needs no further (authenticated) requests. Figures are drawn with
matplotlib's object API, not pyplot, because requests render in parallel threads and pyplot keeps global state.
The page reloads itself every few seconds while the job runs.
"""

from __future__ import annotations

import base64
import io
import json
from html import escape
from pathlib import Path

from matplotlib.figure import Figure
from pydantic import ValidationError

from moedisco.config.resources import ResourcesConfig
from moedisco.job.layout import JobPaths
from moedisco.job.metrics import read_metrics
from moedisco.planning.billing import BilledSpan
from moedisco.runner.report import (
    VIEWS,
    billed_line,
    billed_spans,
    by_stage,
    dollar_views,
    loss_curves,
    plot_cost_bars,
    plot_dollar_views,
)
from service.schemas import CostPublic
from service.store.models import JobRow, StageRow

REFRESH_S = 10
STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1100px} table{border-collapse:collapse;margin:1em 0}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right} th{background:#f3f3f3}"
         "td:first-child,th:first-child{text-align:left} img{max-width:100%} .bad{color:#b00}")


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def loss_figures(records: list[dict]) -> dict[str, str]:
    """Training stage -> <img> of its held-out loss curves (one line per expert)."""
    groups: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for label, curve in loss_curves(records).items():
        groups.setdefault(label.split(" ")[0], {})[label] = curve
    images = {}
    for stage, curves in groups.items():
        fig = Figure(figsize=(6.5, 3.6))
        ax = fig.add_subplot()
        for label, (steps, losses) in sorted(curves.items()):
            ax.plot(steps, losses, marker="o", markersize=3, label=label)
        ax.set(xlabel="step", ylabel="held-out loss", title=f"{stage}: held-out loss")
        ax.legend(fontsize=8)
        fig.tight_layout()
        images[stage] = _png(fig)
    return images


def _resources(job: JobRow) -> ResourcesConfig | None:
    try:  # the job's stored spec; None: the one saved beside cost.json
        return ResourcesConfig.model_validate(job.spec.get("resources", {}))
    except (ValidationError, AttributeError):
        return None


def _spans(job: JobRow, given: list[BilledSpan] | None) -> list[BilledSpan] | None:
    return given if given is not None else billed_spans(Path(job.output_dir) / "cost.json", _resources(job))


def dollar_figure(job: JobRow, records: list[dict], baseline: JobRow | None, spans: list[BilledSpan] | None = None,
                  baseline_spans: list[BilledSpan] | None = None) -> str:
    """Held-out loss against cumulative dollars (paper Figs. 2/4), billed beside compute: this job and its measured
    baseline, each view priced one way for both."""
    jobs = {job.name: (records, Path(job.output_dir) / "cost.json", _spans(job, spans))}
    if baseline is not None:
        folder = Path(baseline.output_dir)
        jobs[f"baseline {baseline.id}"] = (read_metrics(folder / "metrics.jsonl"), folder / "cost.json",
                                           _spans(baseline, baseline_spans))
    compute, billed, notes = dollar_views(jobs)
    fig = Figure(figsize=(12 if billed else 9, 4.2))
    plot_dollar_views(fig, fig.add_gridspec(1, 1)[0], compute, billed, notes)
    fig.tight_layout()
    return _png(fig)


def cost_figure(cost: CostPublic) -> str:
    """Dollars per stage: compute, and billed beside it when nodes were recorded."""
    compute_rows = [row.model_dump() for row in cost.stages]
    billed = cost.billed.basis == "nodes"
    fig = Figure(figsize=(6.5, 3.6))
    plot_cost_bars(fig.add_subplot(), by_stage(compute_rows), by_stage(compute_rows, "lost_usd"),
                   by_stage([row.model_dump() for row in cost.billed.rows]) if billed else None,
                   cost.billed.total_usd if billed else None)
    fig.tight_layout()
    return _png(fig)


def _table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _stage_table(stages: list[StageRow]) -> str:
    rows = [[s.stage, "" if s.expert is None else s.expert, s.state,
             "" if s.step is None else f"{s.step}/{s.total_steps}", _fmt(s.loss), _fmt(s.eval_loss),
             _fmt(s.seconds, 1), _fmt(s.peak_memory_gb, 2)] for s in stages]
    return _table(["stage", "expert", "state", "step", "loss", "held-out loss", "seconds", "peak memory GB"], rows)


def _compute_table(cost: CostPublic) -> str:
    rows = [[r.stage, "" if r.expert is None else r.expert, r.tier, r.device_type, r.num_devices,
             f"{r.device_hours:.5f}", f"{r.price_per_hour:.2f}", f"{r.usd:.5f}" + ("" if r.final else " (so far)")]
            for r in cost.stages]
    rows.append(["total", "", "", "", "", "", "", f"{cost.total_usd:.5f}"])
    return _table(["stage", "expert", "tier", "device", "devices", "hours", "$/h", "$"], rows)


def _billed_table(cost: CostPublic) -> str:
    rows = [[r.stage or "", "" if r.expert is None else r.expert, r.group, len(r.nodes), _fmt(r.busy_seconds, 1),
             _fmt(r.boot_seconds, 1), _fmt(r.between_seconds, 1), _fmt(r.idle_seconds, 1), _fmt(r.seconds / 3600, 5),
             _fmt(r.usd, 5)] for r in cost.billed.rows]
    rows.append(["total", "", "", "", "", "", "", "", _fmt(cost.billed.seconds / 3600, 5),
                 _fmt(cost.billed.total_usd, 5)])
    return _table(["stage", "expert", "group", "nodes", "busy s", "boot s", "between s", "idle s", "node-hours", "$"],
                  rows)


def _baseline_lines(cost: CostPublic) -> list[str]:
    """This job against its baseline, one view per line: a measured baseline is billed as the job is."""
    savings = f", savings {cost.savings_pct:.1f}%" if cost.savings_pct is not None else ""
    if cost.baseline is not None and cost.baseline.kind == "measured":
        lines = [(f"billed: this job ${cost.billed_usd:.3g} vs full-parameter baseline job {cost.baseline.job_id} "
                  f"${cost.baseline.usd:.3g}{savings}")]
        if cost.compute_savings_pct is not None:
            lines.append(f"compute: savings {cost.compute_savings_pct:.1f}% against the same baseline")
        return lines
    if cost.baseline is not None and cost.estimate_usd is not None:
        return [(f"FLOP model (no measured baseline): this job ${cost.estimate_usd:.3g} vs full-parameter "
                 f"baseline ${cost.baseline.usd:.3g}{savings}; the tables are measured, not comparable with these")]
    return []


def _cost_section(cost: CostPublic) -> str:
    lines = [billed_line(cost.billed.model_dump(), cost.total_usd), *_baseline_lines(cost)]
    if cost.simulated:
        lines.append("simulated devices: wall time priced at each tier's rate")
    if cost.note:
        lines.append(cost.note)
    notes = "".join(f"<p>{escape(line)}</p>" for line in lines)
    billed = f"<h3>{escape(VIEWS['billed'])}</h3>{_billed_table(cost)}" if cost.billed.basis == "nodes" else ""
    return f"{billed}<h3>{escape(VIEWS['compute'])}</h3>{_compute_table(cost)}{notes}"


def _evaluation_section(job: JobRow) -> str:
    path = JobPaths(Path(job.output_dir)).evaluation
    if not path.is_file():
        return ""
    models = json.loads(path.read_text())["models"]
    tasks = list(next(iter(models.values()), {}))
    rows = [[task, *(_fmt(models[label].get(task, {}).get("acc"), 3) for label in models)] for task in tasks]
    return "<h2>downstream tasks (lm-evaluation-harness, accuracy)</h2>" + _table(["task", *models], rows)


def render_report(job: JobRow, stages: list[StageRow], records: list[dict], cost: CostPublic,
                  baseline: JobRow | None = None, spans: list[BilledSpan] | None = None,
                  baseline_spans: list[BilledSpan] | None = None) -> str:
    """`spans`, `baseline_spans`: the jobs' billed spans (default: from their runners' ledgers)."""
    refresh = f'<meta http-equiv="refresh" content="{REFRESH_S}">' if job.state in ("queued", "running") else ""
    reason = f'<p class="bad">{escape(job.reason)}</p>' if job.reason else ""
    curves = "".join(f"<h3>{escape(stage)}</h3>{image}" for stage, image in loss_figures(records).items())
    return (f"<!doctype html><html><head><meta charset='utf-8'>{refresh}<title>moedisco job {escape(job.id)}</title>"
            f"<style>{STYLE}</style></head><body>"
            f"<h1>{escape(job.name)} <small>({escape(job.id)})</small></h1>"
            f"<p>state: <b>{escape(job.state)}</b>, method {escape(job.method)}, runner {escape(job.runner)}, "
            f"current stage {escape(job.current_stage or '-')}</p>{reason}"
            f"<h2>stages</h2>{_stage_table(stages)}"
            f"<h2>held-out loss against dollars</h2>{dollar_figure(job, records, baseline, spans, baseline_spans)}"
            f"<h2>held-out loss</h2>{curves or '<p>no evaluations yet</p>'}"
            f"{_evaluation_section(job)}"
            f"<h2>cost</h2>{cost_figure(cost)}{_cost_section(cost)}</body></html>")
