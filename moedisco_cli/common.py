"""What several commands share: the console, the `--set` option, the cost tables, reading a spec file and calling
the API.

    raw = read_spec_file(Path("examples/tiny.yaml"), ["submodel.steps=20"])   # a dict for POST /v1/jobs
    print_cost(summary["cost"])              # `moedisco run`, `moedisco cost`: compute and billed tables, both totals
    job = api_call(ApiClient().job, job_id)                 # an API error is printed, then exits 2 (4xx) or 1
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from moedisco.config.loading import INPUT_PATHS, SpecError, apply_overrides, resolve_relative
from moedisco.job.registry import pipeline_order
from moedisco.planning.billing import KINDS
from moedisco_cli.api_client import ApiError

console = Console()

SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a spec key: --set submodel.steps=50")]


def api_call(method, *args, **kwargs):
    """`method(*args, **kwargs)` of an `ApiClient`; an error is printed and ends the command."""
    try:
        return method(*args, **kwargs)
    except ApiError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2 if 400 <= error.status_code < 500 else 1) from None


def print_cost(summary: dict) -> None:
    """Both views of a job's cost (`moedisco.planning.cost`): the compute table, the billed table and a line with
    both totals. `summary`: cost.json or the API's cost view, either without `billed` when an older moedisco wrote
    it."""
    console.print(compute_table(summary))
    billed = summary.get("billed")
    if billed is None:
        console.print("[dim]no billed view (written by an older moedisco): the compute total is all there is[/dim]")
        return
    if billed["basis"] == "nodes":
        console.print(billed_table(billed))
    from moedisco.runner.report import billed_line  # matplotlib: loaded only to print a cost

    console.print(billed_line(billed, summary["total_usd"]), highlight=False)


def print_versus_rerun(versus: dict) -> None:
    """An extension's cost against running its first job again with every expert (`estimate.rerun_estimate`)."""
    ledger = (f"; its ledger ${versus['ledger_usd']:.5f} against an estimated ${versus['rerun_ledger_usd']:.5f} "
              f"({versus['ledger_share']:.0%})" if versus.get("ledger_share") is not None else "")
    console.print(f"versus re-running {versus['rerun_job']} with {versus['rerun_experts']} experts: "
                  f"{versus['flop_share']:.0%} of its cost under the FLOP model{ledger}", highlight=False)


def compute_table(summary: dict) -> Table:
    table = Table(title="compute: wall time at each tier's price (device-hours)" + (" (simulated devices)"
                                                                                   if summary.get("simulated") else ""))
    for column in ("stage", "expert", "tier", "device", "devices", "hours", "$/h", "$"):
        table.add_column(column, justify="right" if column in ("devices", "hours", "$/h", "$") else "left")
    for row in summary["stages"]:
        table.add_row(row["stage"], "" if row["expert"] is None else str(row["expert"]), row["tier"],
                      row["device_type"], str(row["num_devices"]), f"{row['device_hours']:.5f}",
                      f"{row['price_per_hour']:.2f}", f"{row['usd']:.5f}")
    table.add_row("total", "", "", "", "", "", "", f"{summary['total_usd']:.5f}", style="bold")
    return table


BILLED_SECONDS = tuple(kind for kind in KINDS if kind != "unclaimed")  # a job's kinds: unclaimed time is nobody's


def billed_table(billed: dict) -> Table:
    """`billed_view`'s rows by stage, expert and node group: node-seconds by kind, node-hours and dollars."""
    table = Table(title="billed: node-hours at each node group's price (what budgets count)"
                  + (" (simulated devices)" if billed.get("simulated") else ""))
    for column in ("stage", "expert", "group", "nodes", *(f"{kind} s" for kind in BILLED_SECONDS), "node-hours", "$"):
        table.add_column(column, justify="left" if column in ("stage", "expert", "group") else "right")
    for row in sorted(billed["rows"], key=lambda r: (pipeline_order(r["stage"] or ""), r["expert"] or 0, r["group"])):
        table.add_row(row["stage"] or "", "" if row["expert"] is None else str(row["expert"]), row["group"],
                      str(len(row["nodes"])), *(f"{row[f'{kind}_seconds']:.1f}" for kind in BILLED_SECONDS),
                      f"{row['seconds'] / 3600:.5f}", f"{row['usd']:.5f}")
    table.add_row("total", "", "", "", *(f"{billed['seconds_by_kind'].get(kind, 0.0):.1f}" for kind in BILLED_SECONDS),
                  f"{billed['seconds'] / 3600:.5f}", f"{billed['total_usd']:.5f}", style="bold")
    return table


def read_spec_file(path: Path, overrides: list[str]) -> dict:
    """The YAML as a dict, with --set applied and local input paths made absolute; the server validates it."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise SpecError(f"{path}: the spec must be a mapping of sections")
        apply_overrides(raw, overrides)
    except (OSError, yaml.YAMLError, SpecError) as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    _absolute_local_inputs(raw, path.parent)
    return raw


def _absolute_local_inputs(raw: dict, spec_dir: Path) -> None:
    """Same rule as `moedisco run` (`moedisco.config.loading.resolve_relative`), on the raw dict, and only for paths found here:
    one that exists neither here nor beside the spec is left for the server to resolve."""
    for section, field in INPUT_PATHS:
        fields = raw.get(section)
        value = fields.get(field) if isinstance(fields, dict) else None
        if not isinstance(value, str) or Path(value).is_absolute():
            continue
        found = resolve_relative(Path(value), spec_dir)
        if found.exists():
            fields[field] = str(found.resolve())
