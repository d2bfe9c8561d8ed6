"""What every stage function gets: `StageRun`, the job, its folder, its task and how it is watched.

    summary = merge.stage_merge(StageRun(spec, JobPaths(spec.output_dir), metrics, task=Task("merge")))

A stage function reads its inputs from the job folder (`moedisco.job.layout`), writes its outputs there and returns
its summary, which the runner keeps as the task's marker; a training stage called again resumes from its last
checkpoint. Which function runs which stage is `moedisco.runner.execute.STAGE_FUNCTIONS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from moedisco.config.spec import JobSpec
from moedisco.job.layout import JobPaths
from moedisco.job.metrics import MetricsWriter
from moedisco.job.registry import Task

if TYPE_CHECKING:  # torch: a Ray task handed a StageRun loads it only when it trains (after `prepare_worker`)
    from moedisco.training.loop import TrainContext, TrainHooks
    from moedisco.training.memory import PeakMemory


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

    def train_context(self, seed: int, **options) -> TrainContext:
        """The training loop's context for this task: its run folder, metrics, hooks and `options`."""
        from moedisco.training.loop import TrainContext

        task = self.task
        return TrainContext(run_dir=self.paths.run_dir(task.stage, task.expert), stage=task.stage,
                            expert=task.expert, seed=seed, metrics=self.metrics, spec_yaml=self.spec.to_yaml(),
                            hooks=self.hooks, progress=self.progress, meter=self.meter, **options)
