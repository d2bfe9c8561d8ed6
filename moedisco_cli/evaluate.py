"""`moedisco evaluate MODEL_DIR --tasks ...`: downstream tasks through lm-evaluation-harness, on this machine.

    moedisco evaluate runs/tiny/final --tasks next_paragraph --limit 200
    moedisco evaluate runs/tiny/final --baseline runs/full/final --tasks arc_easy --tasks mmlu --tasks hellaswag \
        --tasks piqa --datasets-cache ~/.cache/huggingface/datasets      # the paper's Table 2
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.table import Table

from moedisco.config.spec import EvaluateConfig
from moedisco_cli.common import console


def scores_table(models: dict[str, dict[str, dict]], title: str = "downstream tasks (lm-evaluation-harness)") -> Table:
    """One row per task, one column per model: accuracy (length-normalised accuracy where the task has it)."""
    table = Table(title=title)
    table.add_column("task")
    table.add_column("shots")
    for label in models:
        table.add_column(f"{label} acc / acc_norm")
    tasks = list(next(iter(models.values()), {}))
    for task in tasks:
        cells = []
        for scores in models.values():
            entry = scores.get(task, {})
            norm = f" / {entry['acc_norm']:.3f}" if entry.get("acc_norm") is not None else ""
            cells.append(f"{entry['acc']:.3f}{norm}" if entry.get("acc") is not None else "-")
        shots = next(iter(models.values()))[task].get("num_fewshot")
        table.add_row(task, "default" if shots is None else str(shots), *cells)
    return table


def evaluate(model_dir: Annotated[Path, typer.Argument(help="Hugging Face model folder, e.g. a job's final/.")],
             tasks: Annotated[list[str], typer.Option(help="lm-eval task names (repeatable).")] = ["next_paragraph"],  # noqa: B006
             baseline: Annotated[Path | None, typer.Option(help="A baseline model folder scored alike.")] = None,
             num_fewshot: Annotated[list[str] | None, typer.Option(help="TASK=N few-shot override (repeatable).")] = None,
             limit: Annotated[int | None, typer.Option(help="At most this many examples per task.")] = None,
             batch_size: Annotated[int, typer.Option(help="Requests per forward pass.")] = 8,
             datasets_cache: Annotated[Path | None, typer.Option(help="Local datasets cache with the tasks' data.")] = None,
             task_dir: Annotated[list[Path] | None, typer.Option(help="Extra lm-eval task YAML folder.")] = None,
             as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Score a model (and a baseline) on downstream tasks with lm-evaluation-harness; nothing is downloaded."""
    from moedisco.stages.evaluate import MissingTaskData, evaluate_models

    try:
        shots = {task: int(n) for task, _, n in (item.partition("=") for item in num_fewshot or [])}
        cfg = EvaluateConfig(tasks=tasks, num_fewshot=shots, limit=limit, batch_size=batch_size,
                             datasets_cache=datasets_cache, task_dirs=task_dir or [], baseline=baseline)
    except (ValueError, ValidationError) as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    models = {"model": model_dir, **({"baseline": baseline} if baseline is not None else {})}
    try:
        record = evaluate_models(models, cfg)
    except (MissingTaskData, FileNotFoundError, ValueError) as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from None
    if as_json:
        console.print_json(json.dumps(record))
    else:
        console.print(scores_table(record["models"]))
