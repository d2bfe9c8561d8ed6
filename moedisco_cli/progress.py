"""Drawing a job's stages in the terminal from what the API returns: a table, or live progress bars per stage and
expert.

    job = follow_job(ApiClient(), job_id, interval_s=2.0, console=console)   # returns the final job
    console.print(stage_table(job["stages"]))
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from moedisco_cli.api_client import ApiClient, ApiError
from service.schemas import TERMINAL_STATES

DONE = ("finished", "skipped")


def stage_label(stage: dict) -> str:
    return stage["stage"] if stage["expert"] is None else f"{stage['stage']} {stage['expert']}"


def _losses(stage: dict) -> str:
    parts = []
    if stage.get("loss") is not None:
        parts.append(f"loss {stage['loss']:.3f}")
    if stage.get("eval_loss") is not None:
        parts.append(f"held-out {stage['eval_loss']:.3f}")
    return "  ".join(parts)


def stage_table(stages: list[dict]) -> Table:
    table = Table()
    for column in ("stage", "state", "step", "losses", "seconds", "peak GB"):
        table.add_column(column)
    for stage in stages:
        step = "" if stage["step"] is None else f"{stage['step']}/{stage['total_steps']}"
        seconds = "" if stage["seconds"] is None else f"{stage['seconds']:.1f}"
        peak = "" if stage.get("peak_memory_gb") is None else f"{stage['peak_memory_gb']:.2f}"
        table.add_row(stage_label(stage), stage["runner_state"] or stage["state"], step, _losses(stage), seconds,
                      peak)
    return table


def _bar_state(stage: dict) -> tuple[int, int]:
    """(completed, total) of a stage's bar: training steps when it logs them, else 0/1 until it ends."""
    total = stage["total_steps"] or 1
    if stage["state"] in DONE:
        return total, total
    return (stage["step"] or 0) if stage["total_steps"] else 0, total


def _update_bars(progress: Progress, bars: dict[str, TaskID], job: dict) -> None:
    for stage in job["stages"]:
        label = stage_label(stage)
        completed, total = _bar_state(stage)
        info = f"{stage['runner_state'] or stage['state']}  {_losses(stage)}"
        if label not in bars:
            bars[label] = progress.add_task(label, total=total, info=info)
        progress.update(bars[label], completed=completed, total=total, info=info)


def cluster_line(client: ApiClient) -> str:
    """The worker nodes by group and those launching, as the autoscaler adds and removes them; empty when the
    service has no Ray cluster to ask."""
    try:
        cluster = client.cluster()
    except ApiError:  # an older service, or one without Ray: the bars go on without this line
        return ""
    alive = ", ".join(f"{group} x{count}" for group, count in sorted(cluster["nodes"].items())) or "no worker node"
    launching = ", ".join(f"{group} x{count}" for group, count in sorted(cluster["launching"].items()))
    return alive + (f"; launching {launching}" if launching else "")


def follow_job(client: ApiClient, job_id: str, interval_s: float, console: Console) -> dict:
    """Poll the job and redraw its bars until it reaches a terminal state."""
    columns = (TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}"))
    bars: dict[str, TaskID] = {}
    with Progress(*columns, console=console) as progress:
        header = progress.add_task("job", total=None, info="")
        nodes = progress.add_task("cluster", total=None, info="")
        while True:
            job = client.job(job_id)
            progress.update(header, description=f"job {job['id']}", info=job["state"])
            progress.update(nodes, info=cluster_line(client))
            _update_bars(progress, bars, job)
            if job["state"] in TERMINAL_STATES:
                progress.update(header, total=1, completed=1)
                return job
            time.sleep(interval_s)
