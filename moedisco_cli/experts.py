"""`moedisco experts`: where each expert of a finished model came from, and how an extension or a retirement moved
the held-out loss of each domain of its lineage.

    moedisco experts 3f2a9c1b7d4e                 # a job of the service (GET /v1/jobs/{id}/experts)
    moedisco experts --local runs/extended        # a job folder here (its final/), or a Hugging Face model folder
    moedisco experts 3f2a9c1b7d4e --json

A job id reads MOEDISCO_API_URL and MOEDISCO_API_TOKEN; `--local` reads the folder as the service reads a job's
(`service.api.routes.experts.read_experts`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.table import Table

from moedisco_cli.api_client import ApiClient
from moedisco_cli.common import api_call, console


def experts_table(entries: list[dict], title: str) -> Table:
    """One row per expert: its index, the job and corpus it was trained on, its cluster (or domain), the method."""
    table = Table(title=title)
    for column in ("expert", "job", "data", "cluster/domain", "method"):
        table.add_column(column, justify="right" if column == "expert" else "left")
    for entry in entries:
        cluster = entry.get("domain") or ("" if entry.get("cluster") is None else str(entry["cluster"]))
        table.add_row(str(entry["expert"]), entry.get("job") or entry.get("origin") or "", entry.get("data") or "",
                      cluster, entry.get("method") or "")
    return table


def _loss(value: float | None, signed: bool = False) -> str:
    return "-" if value is None else f"{value:+.4f}" if signed else f"{value:.4f}"


def domains_table(domains: list[dict], stage: str | None) -> Table:
    """Held-out loss per domain before (the base model) and after (this job's), and the change."""
    table = Table(title=f"held-out loss per domain ({stage} summary)")
    table.add_column("domain")
    for column in ("before", "after", "change"):
        table.add_column(column, justify="right")
    for row in domains:
        table.add_row(row["domain"], _loss(row["before"]), _loss(row["after"]), _loss(row["change"], signed=True))
    return table


def local_view(path: Path) -> dict:
    """The experts view of a job folder (with spec.yaml) or a model folder on this machine; exits 2 without one."""
    from service.api.routes.experts import UnreadableModel, read_experts

    spec_file = path / "spec.yaml"
    spec = yaml.safe_load(spec_file.read_text()) if spec_file.is_file() else None
    try:
        view = read_experts(path, spec) if path.is_dir() else None
    except UnreadableModel as failure:
        console.print(f"[red]{path}: {failure}[/red]")
        raise typer.Exit(1) from None
    if view is None:
        what = "the job has no final/ model yet" if spec is not None else "no config.json: not a model folder"
        console.print(f"[red]{path}: {what}[/red]")
        raise typer.Exit(2)
    return view.model_dump(mode="json")


def print_experts(view: dict) -> None:
    where = f"job {view['job_id']}" if view["job_id"] else "model"
    method = f" ({view['method']})" if view["method"] else ""
    base = f", from {view['base']}" if view["base"] else ""
    console.print(f"{where}{method}{base}: {len(view['experts'])} experts", highlight=False)
    console.print(experts_table(view["experts"], "experts of the final model"))
    if view["retired"]:
        console.print(experts_table(view["retired"], "retired experts (their index in the base model)"))
    if view["domains"]:
        console.print(domains_table(view["domains"], view["domains_stage"]))


def experts(job_id: Annotated[str | None, typer.Argument(help="Job id on the service (or use --local).")] = None,
            local: Annotated[Path | None, typer.Option(
                help="A job folder or Hugging Face model folder on this machine, instead of a job id.")] = None,
            as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """A finished model's experts (the job, corpus and cluster each was trained on) and, for an extension or a
    retirement, the held-out loss per domain before and after."""
    if (job_id is None) == (local is None):
        console.print("[red]give a JOB_ID or --local PATH (one of them)[/red]")
        raise typer.Exit(2)
    view = api_call(ApiClient().experts, job_id) if local is None else local_view(local)
    if as_json:
        console.print_json(json.dumps(view))
    else:
        print_experts(view)
