"""The `moedisco` command line.

    moedisco run examples/tiny.yaml --set submodel.steps=50
    moedisco estimate examples/qwen1.5-moe-a2.7b.yaml
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from moedisco.config import SpecError, load_spec

app = typer.Typer(help="Train Mixture-of-Experts models cheaply (MoE-DisCo).", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console()

SpecArg = Annotated[Path, typer.Argument(help="Job spec YAML.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a spec key: --set submodel.steps=50")]


def _load(spec_path: Path, overrides: list[str] | None):
    try:
        return load_spec(spec_path, overrides or [])
    except SpecError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None


def print_cost(summary: dict) -> None:
    table = Table(title="cost" + (" (simulated devices: wall time priced at each tier's rate)"
                                  if summary.get("simulated") else ""))
    for column in ("stage", "expert", "tier", "device", "devices", "hours", "$/h", "$"):
        table.add_column(column, justify="right" if column in ("devices", "hours", "$/h", "$") else "left")
    for row in summary["stages"]:
        table.add_row(row["stage"], "" if row["expert"] is None else str(row["expert"]), row["tier"],
                      row["device_type"], str(row["num_devices"]), f"{row['device_hours']:.5f}",
                      f"{row['price_per_hour']:.2f}", f"{row['usd']:.5f}")
    table.add_row("total", "", "", "", "", "", "", f"{summary['total_usd']:.5f}", style="bold")
    console.print(table)


@app.command()
def run(spec: SpecArg, set_: SetOpt = None,
        runner: Annotated[str, typer.Option(help="`local` (in process) or `ray`.")] = "local",
        address: Annotated[str | None, typer.Option(help="Ray cluster address; unset starts a local one.")] = None,
        quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False) -> None:
    """Run a job; re-running on the same output_dir resumes it."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    job = _load(spec, set_)
    if runner == "ray":
        from ray_cluster.orchestrate import run_job_on_ray

        summary = run_job_on_ray(job, address=address, progress=not quiet)
    elif runner == "local":
        from moedisco.runner import run_job

        summary = run_job(job, events=_echo_stage_events, progress=not quiet)
    else:
        console.print(f"[red]--runner must be `local` or `ray`, got {runner!r}[/red]")
        raise typer.Exit(2)
    print_cost(summary["cost"])
    console.print(f"final model: {summary['final']}\nreport: {Path(summary['output_dir']) / 'report.png'}")


def _echo_stage_events(event: dict) -> None:
    if event["event"] == "stage_finished":
        expert = "" if event["expert"] is None else f" {event['expert']}"
        loss = event["summary"].get("eval_loss")
        console.print(f"[green]done[/green] {event['stage']}{expert}" + (f"  held-out loss {loss:.4f}" if loss else ""))
    elif event["event"] == "stage_skipped":
        console.print(f"[dim]skip {event['stage']} (already done)[/dim]")


@app.command()
def estimate(spec: SpecArg, set_: SetOpt = None,
             as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Parameter counts, memory plan per tier and cost estimate, without training."""
    from moedisco.estimate import estimate_job, render_estimate

    result = estimate_job(_load(spec, set_))
    if as_json:
        console.print_json(json.dumps(result))
    else:
        render_estimate(result, console)


def _register_optional_commands() -> None:
    # The control plane (`serve`, `submit`, `jobs`, ...) and the Ray cluster commands live with their packages;
    # each exposes `register(app)`. They are optional so the algorithm's CLI works without them.
    import importlib

    for module in ("ray_cluster.cli", "service.cli"):
        try:
            importlib.import_module(module).register(app)
        except ModuleNotFoundError as error:
            if error.name is None or not module.startswith(error.name.split(".")[0]):
                raise


def main() -> None:
    _register_optional_commands()
    app()


if __name__ == "__main__":
    main()
