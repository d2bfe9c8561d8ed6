"""The job's data worker: the data stages of a corpus of one shard (but `source`, on the CPU tier) in one process on
the cheap tier.

    if data_stages_in_one_process(spec) and data_stages_pending(spec):
        worker = start_data_worker(spec)
    summary = ray.get(worker.run.remote(stage_run, reporter))   # as `ray_cluster.data.stages.DATA_STAGES` says

A MoE-DisCo job whose train split fits one shard (`fits_one_process`: known from `data.max_documents` before
prepare, else counted after it) would have Ray Data embed it with a single actor anyway, and Ray Data's start-up
would cost more than the work. Its data stages run instead in one `DataWorker`, placed like an embedding actor (one
cheap node and its GPU, if any), which imports moedisco's stages once when it starts and writes the same shards and
OUTPUT files as the Ray Data path. Each stage it runs holds its node from the end of the one before (the first:
from the worker's start, imports included) to its own end (`node_uses.NodeUseReporter`), so the stages share out
its whole life. Light to import (Ray and the spec only), as `ray_cluster.prestart` must be.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import ray

from moedisco.config.resources import TierConfig
from moedisco.config.spec import JobSpec
from moedisco.job.layout import JobPaths, is_done
from moedisco.job.registry import STAGE, plan
from ray_cluster.node_uses import SILENT, NodeUseReporter
from ray_cluster.placement import prepare_worker, task_options

if TYPE_CHECKING:
    from moedisco.stages.stage_run import StageRun


class DataWorker:
    """One process on the cheap tier for the data stages of a one-shard corpus (`start_data_worker`)."""

    def __init__(self, tier: TierConfig):
        self.idle_since = time.time()  # when the node's resources were last held for no stage
        prepare_worker(tier)  # before the imports below touch torch
        from moedisco.runner import execute  # noqa: F401  (torch, transformers, scikit-learn: once, here)
        from ray_cluster.data.stages import DATA_STAGES

        self.stages = DATA_STAGES

    def run(self, stage_run: StageRun, reporter: NodeUseReporter | None = None) -> dict:
        """A data stage: its `in_one_process` variant, else moedisco's stage function as it is."""
        from moedisco.runner.execute import run_stage

        try:
            with (reporter or SILENT).held(start=self.idle_since):
                in_one_process = self.stages[stage_run.task.stage].in_one_process
                if in_one_process is None:
                    return run_stage(stage_run)
                return in_one_process(stage_run.spec, stage_run.paths)
        finally:
            self.idle_since = time.time()


def fits_one_process(spec: JobSpec, num_documents: int | None) -> bool:
    # One shard: Ray Data would embed it with one actor anyway.
    return num_documents is not None and num_documents <= spec.data.rows_per_shard


def train_documents(spec: JobSpec) -> int | None:
    """Documents in the train split: counted once prepare has written it, else at most `data.max_documents`."""
    train = JobPaths(spec.output_dir).texts("train")
    if train.is_file():
        with train.open() as handle:
            return sum(1 for line in handle if line.strip())
    return spec.data.max_documents


def data_stages_in_one_process(spec: JobSpec) -> bool:
    # Only the methods that embed and cluster have data stages to share a process (a retirement has no corpus).
    return spec.method in ("moe_disco", "extend") and fits_one_process(spec, train_documents(spec))


def data_stages_pending(spec: JobSpec) -> bool:
    """Whether a set-up task of the job's plan is unfinished (a job that embeds nothing has no embed task)."""
    paths = JobPaths(spec.output_dir)
    return any(not is_done(paths, task.marker) for group in plan(spec) for task in group if STAGE[task.stage].setup)


def start_data_worker(spec: JobSpec):
    """The data worker, placed like the Ray Data path's embedding actors: one cheap node (and its GPU, if any).
    Its stages are idempotent: on a lost node it restarts elsewhere and the call in flight runs again."""
    tier, retries = spec.resources.submodel_tier, spec.resources.max_failures
    return ray.remote(DataWorker).options(**task_options(spec, tier), max_restarts=retries,
                                          max_task_retries=retries).remote(tier)
