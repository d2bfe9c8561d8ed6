"""What a stage function gets (`StageRun`), and running one task of the stage table in this process.

    summary = run_stage(StageRun(spec, JobPaths(spec.output_dir), metrics, task=Task("merge")))

Apart from `moedisco.stages` because it names the training hooks and the metrics writer, which themselves read the
stage table: the table stays at the bottom, with no import back.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moedisco.stages import STAGE, Task

if TYPE_CHECKING:
    from moedisco.config import JobSpec
    from moedisco.layout import JobPaths
    from moedisco.memory import PeakMemory
    from moedisco.metrics import MetricsWriter
    from moedisco.train import TrainHooks


@dataclass
class StageRun:
    """Everything a stage function gets: the job, where it writes, and how it is watched."""

    spec: JobSpec
    paths: JobPaths
    metrics: MetricsWriter
    task: Task
    hooks: TrainHooks | None = None
    progress: bool = True
    meter: PeakMemory | None = None  # a training stage's peak memory (set by `run_stage`)

    @property
    def round_index(self) -> int:
        """The synchronisation round of a per-round stage (a job without rounds runs round 0 only)."""
        return self.task.round if self.task.round is not None else self.spec.branch.sync_rounds - 1


def stage_function(stage: str) -> Callable[[StageRun], dict]:
    module, name = STAGE[stage].function.split(":")
    return getattr(importlib.import_module(module), name)


def run_stage(run: StageRun) -> dict:
    """Run one task in this process; returns its summary. A training stage's summary adds its peak memory
    (`peak_memory_gb`, metered from before its model is built) and the memory measures it trained with."""
    stage = STAGE[run.task.stage]
    if not stage.trained:
        return stage_function(stage.name)(run)
    from moedisco.embed import resolve_device
    from moedisco.memory import PeakMemory, measures_of

    cfg = getattr(run.spec, stage.train_config)
    run.meter = PeakMemory(resolve_device(cfg.device))
    summary = stage_function(stage.name)(run)
    return {**summary, "peak_memory_gb": run.meter.peak_gb(), "memory_measures": measures_of(cfg)}
