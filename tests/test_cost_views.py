"""The two cost views where they are shown: the report's loss-against-dollars curves and cost bars
(moedisco.runner.report, service.reporting.report) and the CLI's cost tables (moedisco_cli). A hand-made job
folder: no Ray, no training."""

import json

import pytest
import yaml
from matplotlib.figure import Figure

from moedisco.config.resources import ResourcesConfig
from moedisco.job.metrics import read_metrics
from moedisco.planning.billing import NodeLife, accrued_usd
from moedisco.planning.cost import CostLedger
from moedisco.runner.report import (
    VIEWS,
    billed_curve,
    billed_spans,
    dollar_curve,
    dollar_views,
    plot_dollar_views,
    write_report,
)
from moedisco_cli.common import console, print_cost
from moedisco_cli.jobs import comparison_lines
from service.reporting.report import render_report
from service.schemas import BilledPublic, CostPublic, CostRowPublic
from service.store.models import JobRow

T0 = 1_700_000_000.0
NOW = T0 + 10_000  # long after every node ended
# Every group keeps its idle nodes 100 s (the A100 group's own default is 60 s), which the figures below assume.
IDLE = {"idle_timeout_s": 100.0, "node_groups": {"expensive-a100": {"idle_timeout_s": 100.0}}}
RESOURCES = ResourcesConfig(**IDLE)
CHEAP = 0.35 / 3600  # cheap-4090: one rtx4090, dollars per node-second
DEAR = 2.28 / 3600  # expensive-a100: one a100


def write_job(folder, usage: bool = True):
    """Two submodels on two cheap nodes (booted for them, idle after them), a fine-tune on an A100 node; metrics
    every 100 s. Without `usage`: the cost.json of a moedisco before the billed view."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.yaml").write_text(yaml.safe_dump({"resources": IDLE}))
    ledger = CostLedger(folder / "cost.json", RESOURCES)
    ledger.begin(now=T0)
    ledger.record("embed", RESOURCES.submodel_tier, seconds=30.0, device="cuda:0")
    for expert in (0, 1):
        ledger.record("submodel", RESOURCES.submodel_tier, seconds=200.0, device="cuda:0", expert=expert)
    ledger.record("finetune", RESOURCES.finetune_tier, seconds=100.0, device="cuda:0")
    ledger.add_uses([{"node": "n1", "start": T0 + 50, "end": T0 + 80, "stage": "embed"},
                     {"node": "n1", "start": T0 + 100, "end": T0 + 300, "stage": "submodel", "expert": 0},
                     {"node": "n2", "start": T0 + 100, "end": T0 + 300, "stage": "submodel", "expert": 1},
                     {"node": "a1", "start": T0 + 370, "end": T0 + 470, "stage": "finetune"}])
    ledger.set_nodes([NodeLife("n1", "cheap-4090", requested_at=T0, started_at=T0 + 40, ended_at=T0 + 450),
                      NodeLife("n2", "cheap-4090", requested_at=T0, started_at=T0 + 40, ended_at=T0 + 450),
                      NodeLife("a1", "expensive-a100", requested_at=T0 + 300, started_at=T0 + 360,
                               ended_at=T0 + 600)])
    if not usage:
        saved = json.loads((folder / "cost.json").read_text())
        (folder / "cost.json").write_text(json.dumps({k: v for k, v in saved.items() if k not in ("billed", "usage")}))
    records = [{"stage": "submodel", "expert": expert, "step": step, "eval_loss": 5.0 - step / 10 - expert / 100,
                "seconds": step * 10.0, "time": T0 + 100 + step * 10} for step in (0, 10, 20) for expert in (0, 1)]
    records += [{"stage": "merge", "step": 0, "eval_loss": 3.5, "time": T0 + 320},
                {"stage": "finetune", "step": 0, "eval_loss": 3.4, "seconds": 10.0, "time": T0 + 380},
                {"stage": "finetune", "step": 10, "eval_loss": 3.0, "seconds": 100.0, "time": T0 + 470}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_billed_curve_rises_with_the_nodes_time_and_ends_at_the_billed_total(tmp_path):
    folder = write_job(tmp_path / "job")
    spans = billed_spans(folder / "cost.json", now=NOW)  # priced by the spec.yaml beside cost.json
    points = billed_curve(read_metrics(folder / "metrics.jsonl"), spans)
    dollars = [usd for usd, _, _ in points]
    billed_total = json.loads((folder / "cost.json").read_text())["billed"]["total_usd"]
    assert dollars == sorted(dollars) and dollars[-1] == pytest.approx(billed_total)
    # At the submodels' step 10 (T0+200): both nodes' boot (50 s and 100 s), n1's embed (30 s) and its wait for
    # the submodel (20 s), and half of each submodel's 200 s, pro rata.
    assert points[1][0] == pytest.approx((50 + 30 + 20 + 100 + 100 + 100) * CHEAP)
    # The last record (T0+470): everything but the A100's idle time before scale-down, which the tail adds.
    assert points[-2][0] == pytest.approx(billed_total - 100 * DEAR)
    assert [tier for _, _, tier in points] == ["submodel_tier"] * 3 + ["finetune_tier"] * 3
    assert accrued_usd(spans, until=T0) == 0 and accrued_usd(spans, until=NOW) == pytest.approx(billed_total)
    compute = dollar_curve(read_metrics(folder / "metrics.jsonl"), folder / "cost.json")
    assert compute[-1][0] == pytest.approx(json.loads((folder / "cost.json").read_text())["total_usd"])
    assert [loss for _, loss, _ in compute] == [loss for _, loss, _ in points[:len(compute)]]


def test_the_report_draws_billed_beside_compute_and_an_old_cost_json_in_compute_only(tmp_path):
    new, old = write_job(tmp_path / "new"), write_job(tmp_path / "old", usage=False)
    assert billed_spans(old / "cost.json") is None
    jobs = {name: (read_metrics(folder / "metrics.jsonl"), folder / "cost.json", billed_spans(folder / "cost.json"))
            for name, folder in (("new", new), ("old", old))}
    compute, billed, notes = dollar_views(jobs)
    assert set(compute) == {"new", "old"} and set(billed) == {"new"}
    assert notes == ["old: no billed view (cost.json of an older moedisco): compute only"]
    fig = Figure()
    plot_dollar_views(fig, fig.add_gridspec(1, 1)[0], compute, billed, notes)
    assert [ax.get_title() for ax in fig.axes] == [f"held-out loss against dollars: {VIEWS[v]}"
                                                   for v in ("billed", "compute")]
    fig = Figure()
    plot_dollar_views(fig, fig.add_gridspec(1, 1)[0], {"old": compute["old"]}, {}, notes[:1])
    assert [ax.get_title() for ax in fig.axes] == [f"held-out loss against dollars: {VIEWS['compute']}"]
    for folder in (new, old):
        out = write_report(folder / "metrics.jsonl", folder / "cost.json", folder / "report.png", title="tiny",
                           baseline=old, now=NOW)
        assert out.stat().st_size > 10_000


def cli_output(summary: dict, monkeypatch) -> str:
    # `_width`, not `width`: restoring the property would pin every later command to the width it read then (80)
    monkeypatch.setattr(console, "_width", 160)  # a terminal wide enough for the billed table's ten columns
    with console.capture() as captured:
        print_cost(summary)
    return " ".join(captured.get().replace("│", " ").split())


def test_the_cli_prints_both_views_and_says_what_budgets_count(tmp_path, monkeypatch):
    cost = json.loads((write_job(tmp_path / "job") / "cost.json").read_text())
    printed = cli_output(cost, monkeypatch)
    assert "compute: wall time at each tier's price" in printed and "billed: node-hours" in printed
    assert "submodel 1 cheap-4090 1 200.0 100.0 0.0 100.0" in printed  # busy, boot, between, idle seconds
    billed, compute = cost["billed"]["total_usd"], cost["total_usd"]
    assert (f"billed ${billed:.5f} (node-hours: boot 21%, busy 50%, waits 2%, idle 28%) vs compute ${compute:.5f}; "
            "budgets (max_cost_usd) count the billed dollars") in printed
    local = {**cost, "billed": {**cost["billed"], "basis": "compute", "total_usd": compute, "rows": []}}
    printed = cli_output(local, monkeypatch)
    assert "billed: node-hours" not in printed
    assert "no node was recorded (one machine), so the billed total is the compute total" in printed
    older_server = {k: v for k, v in cost.items() if k != "billed"}
    assert "no billed view (written by an older moedisco)" in cli_output(older_server, monkeypatch)


def test_the_cli_compares_billed_with_billed_and_an_older_server_by_wall_time():
    baseline = {"kind": "measured", "usd": 2.0, "job_id": "b1"}
    view = {"baseline": baseline, "savings_pct": 50.0, "compute_savings_pct": 60.0, "total_usd": 0.8,
            "billed": {"total_usd": 1.0}}
    assert comparison_lines(view) == ["billed: this job $1 vs full-parameter baseline job b1 $2, savings "
                                      "[bold]50.0%[/bold]", "compute: savings 60.0% against the same baseline"]
    older = {"baseline": baseline, "savings_pct": 60.0, "total_usd": 0.8}
    assert comparison_lines(older)[0].startswith("wall time at tier prices: this job $0.8 vs")


def test_the_service_report_shows_the_billed_table_curve_and_bars(tmp_path):
    folder = write_job(tmp_path / "job")
    saved = json.loads((folder / "cost.json").read_text())
    job = JobRow(id="0123456789ab", name="tiny", method="moe_disco", state="succeeded", runner="ray",
                 spec={"resources": IDLE}, output_dir=str(folder), reason=None,
                 current_stage=None)
    cost = CostPublic(job_id=job.id, owner="ada", state="succeeded", live=False,
                      billed=BilledPublic(**saved["billed"]), billed_usd=saved["billed"]["total_usd"],
                      stages=[CostRowPublic(**row, final=True) for row in saved["stages"]],
                      by_tier_usd=saved["by_tier_usd"], total_usd=saved["total_usd"], simulated=False,
                      prices_per_hour=saved["prices_per_hour"], baseline=None)
    html = render_report(job, [], read_metrics(folder / "metrics.jsonl"), cost)
    assert f"<h3>{VIEWS['billed']}</h3>" in html and f"<h3>{VIEWS['compute']}</h3>" in html
    assert "<td>submodel</td><td>1</td><td>cheap-4090</td><td>1</td><td>200.0</td><td>100.0</td>" in html
    assert f"billed ${cost.billed_usd:.5f} (node-hours: boot 21%" in html
    assert html.count("data:image/png;base64,") == 4  # the dollar curves, 2 loss figures, the cost bars
