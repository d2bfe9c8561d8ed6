"""The `moedisco` command line (the entry point of the `moedisco` script).

    moedisco run examples/tiny.yaml --set submodel.steps=50
    moedisco estimate examples/qwen1.5-moe-a2.7b.yaml
    moedisco estimate SPEC --hours submodel=2.09 --hours finetune=1.73 --hours full_parameter=9.87  # measured
    moedisco evaluate runs/tiny/final --tasks next_paragraph --limit 200
    moedisco experts --local runs/extended        # where each expert came from; loss per domain
    moedisco --help              # also: cluster, serve, submit, jobs, status, cost, cancel, demo, users, tokens
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from moedisco.config.loading import SpecError, load_spec
from moedisco_cli import cluster, demo, evaluate, experts, files, jobs, serve, users
from moedisco_cli.common import SetOpt, console, print_cost, print_versus_rerun
from moedisco_cli.job_events import ConsoleProgress

app = typer.Typer(help="Train Mixture-of-Experts models cheaply (MoE-DisCo).", no_args_is_help=True,
                  pretty_exceptions_enable=False)

SpecArg = Annotated[Path, typer.Argument(help="Job spec YAML.")]


def _load(spec_path: Path, overrides: list[str] | None):
    try:
        return load_spec(spec_path, overrides or [])
    except SpecError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None


@app.command()
def run(spec: SpecArg, set_: SetOpt = None,
        runner: Annotated[str, typer.Option(help="`local` (in process) or `ray`.")] = "local",
        address: Annotated[str | None, typer.Option(help="Ray cluster address; unset starts a local one.")] = None,
        quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False) -> None:
    """Run a job; re-running on the same output_dir resumes it."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    job = _load(spec, set_)
    if runner not in ("local", "ray"):
        console.print(f"[red]--runner must be `local` or `ray`, got {runner!r}[/red]")
        raise typer.Exit(2)
    from moedisco.training.loop import Preempted

    try:  # the runner plans memory first: a training stage that fits no device is refused before any stage
        if runner == "ray":
            from moedisco.planning.memory_plan import resolve_memory
            from ray_cluster.orchestrate import run_job_on_ray

            resolve_memory(job)  # a refusal before a Ray cluster is started or joined; the runner plans again
            summary = run_job_on_ray(job, address=address, events=None if quiet else ConsoleProgress())
        else:
            from moedisco.runner.job_runner import run_job

            # Training steps are tqdm bars here; the events say when stages start, end or are skipped.
            summary = run_job(job, events=ConsoleProgress(steps=False), progress=not quiet)
    except SpecError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    except ConnectionError as error:  # a Ray cluster that cannot be reached, or wants its token (ray_cluster.auth)
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from None
    except Preempted as stop:  # SIGTERM: the stage checkpointed its step; a re-run resumes there
        console.print(f"[yellow]{stop}; run again to resume[/yellow]")
        raise typer.Exit(143) from None  # 128 + SIGTERM, as a process ended by the signal would
    print_cost(summary["cost"])
    if summary.get("versus_rerun"):
        print_versus_rerun(summary["versus_rerun"])
    console.print(f"final model: {summary['final']}\nreport: {Path(summary['output_dir']) / 'report.png'}")


@app.command()
def estimate(spec: SpecArg, set_: SetOpt = None,
             hours: Annotated[list[str] | None, typer.Option(
                 "--hours", help="Measured wall hours of a stage, STAGE=HOURS: warmup, submodel (the slowest "
                 "one), finetune, full_parameter.")] = None,
             convention: Annotated[str | None, typer.Option(
                 help="`flop` (the FLOP model) or `paper` (the --hours, submodels E x the slowest, as the paper's "
                 "Table 3); unset = paper with --hours, else flop.")] = None,
             as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Parameter counts, memory plan per tier and cost estimate, without training."""
    from moedisco.planning.estimate import EstimateError, estimate_job
    from moedisco_cli.estimate import parse_hours, render_estimate

    job = _load(spec, set_)
    try:
        result = estimate_job(job, hours=parse_hours(hours or []), convention=convention)
    except EstimateError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    if as_json:
        console.print_json(json.dumps(result))
    else:
        render_estimate(result, console)


app.command()(evaluate.evaluate)

# The order of `moedisco --help`: the service, the demo, the API client's commands; groups (cluster) come last.
app.command()(serve.serve)
app.command()(demo.demo)
jobs.register(app)
app.command()(experts.experts)
app.command()(files.upload)
app.add_typer(files.files_app, name="files")
app.add_typer(cluster.cluster_app, name="cluster")
app.add_typer(users.users_app, name="users")
app.add_typer(users.tokens_app, name="tokens")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
