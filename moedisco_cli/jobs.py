"""`moedisco submit | jobs | status | cost | cancel | resume`: the command-line client of the REST API.

    moedisco submit examples/tiny.yaml --set submodel.steps=20 --follow
    moedisco jobs --state running
    moedisco status 3f2a9c1b7d4e --follow            # progress bars per stage and expert
    moedisco cost 3f2a9c1b7d4e
    moedisco cancel 3f2a9c1b7d4e
    moedisco resume 3f2a9c1b7d4e --follow            # a failed or cancelled job, on its output_dir

The commands read MOEDISCO_API_URL (default http://127.0.0.1:8000) and MOEDISCO_API_TOKEN.
`moedisco_cli.main` calls `register(app)` to add them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from moedisco_cli.api_client import ApiClient
from moedisco_cli.common import SetOpt, api_call, console, print_cost, read_spec_file
from moedisco_cli.evaluate import scores_table
from moedisco_cli.progress import follow_job, stage_table
from service.schemas import TERMINAL_STATES

JobIdArg = Annotated[str, typer.Argument(help="Job id (from `moedisco submit` or `moedisco jobs`).")]


def submit(spec: Annotated[Path, typer.Argument(help="Job spec YAML.")], set_: SetOpt = None,
           follow: Annotated[bool, typer.Option(help="Then follow it like `status --follow`.")] = False) -> None:
    """Submit a job. Relative input paths that exist here are sent as absolute paths; the others are resolved by
    the server against MOEDISCO_DATA_DIR. The spec's output_dir is replaced by the server's job folder."""
    job = api_call(ApiClient().submit, read_spec_file(spec, set_ or []))
    console.print(f"submitted [bold]{job['id']}[/bold] ({job['name']}): {job['state']}, output {job['output_dir']}")
    if follow:
        status(job["id"], follow=True)


def jobs(state: Annotated[list[str] | None, typer.Option(help="Only jobs in this state (repeatable).")] = None,
         limit: Annotated[int, typer.Option(help="Jobs per page.")] = 20,
         offset: Annotated[int, typer.Option(help="Jobs to skip.")] = 0) -> None:
    """List jobs, newest first."""
    page = api_call(ApiClient().jobs, state, offset, limit)
    table = Table(title=f"jobs {offset + 1}-{offset + len(page['data'])} of {page['count']}")
    for column in ("id", "name", "owner", "method", "state", "stage", "created", "reason"):
        table.add_column(column)
    for job in page["data"]:
        table.add_row(job["id"], job["name"], job["owner"], job["method"], job["state"], job["current_stage"] or "",
                      job["created_at"][:19].replace("T", " "), job["reason"] or "")
    console.print(table)


def status(job_id: JobIdArg,
           follow: Annotated[bool, typer.Option(help="Progress bars per stage and expert until the job ends.")] = False,
           interval: Annotated[float, typer.Option(help="Seconds between polls with --follow.")] = 2.0) -> None:
    """A job's state and its stages (per expert: step, losses). With --follow, exits 1 unless it succeeded."""
    client = ApiClient()
    job = api_call(follow_job, client, job_id, interval, console) if follow else api_call(client.job, job_id)
    console.print(f"job [bold]{job['id']}[/bold] ({job['name']}): [bold]{job['state']}[/bold]"
                  + (f" - {job['reason']}" if job["reason"] else "")
                  + (" (cancel requested)" if job["cancel_requested"] and job["state"] not in TERMINAL_STATES else ""))
    base = base_line(job)
    if base is not None:
        console.print(base, highlight=False)
    if job["attempts"] > 1 or job.get("cluster_restarts"):  # the runner was relaunched: say why it was
        console.print(f"runner starts: {job['attempts']} charged to the job, {job.get('cluster_restarts', 0)} after "
                      "cluster events (a lost node or cluster, an upgrade's handover)")
    if not follow:
        console.print(stage_table(job["stages"]))
    evaluation = api_call(client.evaluation, job_id) if any(s["stage"] == "evaluate" for s in job["stages"]) else None
    if evaluation is not None:
        models = {**evaluation["models"], **({f"baseline job {evaluation['baseline_job_id']}": evaluation["baseline"]}
                                             if evaluation["baseline"] else {})}
        console.print(scores_table(models))
    if follow and job["state"] != "succeeded":
        raise typer.Exit(1)


def base_line(job: dict) -> str | None:
    """What an extension or a retirement starts from (`moedisco experts` shows the rest); None for other methods."""
    spec, more = job.get("spec") or {}, f"(experts: moedisco experts {job['id']})"
    if spec.get("method") == "extend":
        return f"extends {spec['extend']['base']} with {spec['extend']['new_experts']} new expert(s) {more}"
    if spec.get("method") == "retire":
        return f"retires experts {spec['retire']['experts']} of {spec['retire']['base']} {more}"
    return None


def comparison_lines(view: dict) -> list[str]:
    """This job against its baseline under one cost model, named: billed dollars against a measured baseline's
    billed dollars (compute against compute beside it), or the FLOP model against the FLOP model; never one against
    the other. A view without `billed` (an older server) priced a measured baseline by wall time."""
    baseline = view["baseline"]
    if baseline is None:
        return []
    savings = f", savings [bold]{view['savings_pct']:.1f}%[/bold]" if view["savings_pct"] is not None else ""
    if baseline["kind"] == "measured" and "billed" not in view:
        return [f"wall time at tier prices: this job ${view['total_usd']:.3g} vs full-parameter baseline job "
                f"{baseline['job_id']} ${baseline['usd']:.3g}{savings}"]
    if baseline["kind"] == "measured":
        lines = [f"billed: this job ${view['billed']['total_usd']:.3g} vs full-parameter baseline job "
                 f"{baseline['job_id']} ${baseline['usd']:.3g}{savings}"]
        if view.get("compute_savings_pct") is not None:
            lines.append(f"compute: savings {view['compute_savings_pct']:.1f}% against the same baseline")
        return lines
    if view.get("estimate_usd") is None:
        return []
    return [f"FLOP model (no measured baseline): this job ${view['estimate_usd']:.3g} vs full-parameter baseline "
            f"${baseline['usd']:.3g}{savings}; the tables above are measured, not comparable with these"]


def cost(job_id: JobIdArg) -> None:
    """Dollars per stage in both views, billed (node-hours at group prices: what budgets count) and compute
    (device-hours at tier prices), the totals, and the full-parameter baseline with the savings."""
    view = api_call(ApiClient().cost, job_id)
    print_cost(view)
    if view["live"]:
        console.print("[yellow]job running: stages in progress and nodes still held are priced so far[/yellow]")
    for line in comparison_lines(view):
        console.print(line)
    if view["note"]:
        console.print(f"[dim]{view['note']}[/dim]")


def cancel(job_id: JobIdArg) -> None:
    """Cancel a job: a queued one at once, a running one at its next stage boundary or checkpoint."""
    job = api_call(ApiClient().cancel, job_id)
    word = "cancelled" if job["state"] == "cancelled" else "cancel requested (stops at the next stage boundary)"
    console.print(f"job {job['id']}: {word}")


def resume(job_id: JobIdArg,
           follow: Annotated[bool, typer.Option(help="Then follow it like `status --follow`.")] = False) -> None:
    """Queue a failed or cancelled job again: it skips its finished stages and resumes the interrupted one from
    its last checkpoint."""
    job = api_call(ApiClient().resume, job_id)
    console.print(f"job {job['id']}: queued again on {job['output_dir']}")
    if follow:
        status(job_id, follow=True)


def register(app: typer.Typer) -> None:
    for command in (submit, jobs, status, cost, cancel, resume):
        app.command()(command)
