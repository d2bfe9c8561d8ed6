"""The processes a job on Ray will need, started before its driver has imported the stages (light to import on
purpose: Ray and the spec only), so that their start-ups and imports overlap the driver's own.

    prestart_job(spec)                       # e.g. the service's job actor, first thing
    helpers = take_prestarted(spec)          # RayExecutor: the handles started above, else None
    helpers = start_helpers(spec)            # RayExecutor, when nothing was started ahead

- `TrainerLauncher`: the actor whose threads run the job's `trainer.fit()` calls (`ray_cluster.trainers`); it
  imports torch when it starts, which unpickling the first trainer would otherwise do then.
- `DataWorker`: for a MoE-DisCo job whose train split fits one shard (`fits_one_process`), one actor on the cheap
  tier that runs the data stages in one process: prepare and source as they are, embed and cluster through
  `ray_cluster.data.embed_in_process` / `cluster_in_process` (Ray Data's own start-up would cost more than the
  work). It imports moedisco's stages when it starts and loads the embedding model once.

A started helper belongs to the process that started it: if that process ends, Ray ends the helpers with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from moedisco.config.resources import TierConfig
from moedisco.config.spec import JobSpec
from moedisco.job.layout import JobPaths, is_done
from moedisco.job.registry import STAGES
from ray_cluster.placement import on_driver_node, prepare_worker, task_options

MAX_CONCURRENT_TRAINERS = 256
ONE_PROCESS_MAX_DOCUMENTS = 4096  # ray_cluster.corpus.ROWS_PER_SHARD: Ray Data would embed it with one actor anyway
SETUP_STAGES = tuple(stage.name for stage in STAGES if stage.setup)  # what the data worker may run


@ray.remote(max_concurrency=MAX_CONCURRENT_TRAINERS)
class TrainerLauncher:
    def __init__(self):
        # Unpickling the first trainer imports torch (its backend config): done here, while the job's first
        # stages run, rather than when the first trainer is due (seconds on a busy machine).
        import torch  # noqa: F401

    def fit(self, trainer) -> dict:
        """Run the trainer to the end; rank 0's stage summary (the train function's return value)."""
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        return result.return_value


class DataWorker:
    """One process on the cheap tier for the data stages of a one-shard corpus (`start_data_worker`)."""

    def __init__(self, tier: TierConfig):
        prepare_worker(tier)  # before the imports below touch torch
        from moedisco.runner import execute  # noqa: F401  (torch, transformers, scikit-learn: once, here)

        self.embedder = None

    def run(self, run) -> dict:
        """A set-up stage as it is (`moedisco.stages.stage_run.StageRun`)."""
        from moedisco.runner.execute import run_stage

        return run_stage(run)

    def embed(self, spec: JobSpec, paths) -> dict:
        from ray_cluster.corpus import parallel_tokenizer
        from ray_cluster.data import embed_in_process

        if self.embedder is None:
            from moedisco.stages.embed import Embedder

            parallel_tokenizer()
            self.embedder = Embedder(spec.embed)
        return embed_in_process(spec, paths, self.embedder)

    def cluster(self, spec: JobSpec, paths) -> dict:
        from ray_cluster.data import cluster_in_process

        return cluster_in_process(spec, paths)


def fits_one_process(num_documents: int | None) -> bool:
    return num_documents is not None and num_documents <= ONE_PROCESS_MAX_DOCUMENTS


def train_documents(spec: JobSpec) -> int | None:
    """Documents in the train split: counted once prepare has written it, else at most `data.max_documents`."""
    train = JobPaths(spec.output_dir).texts("train")
    if train.is_file():
        with train.open() as handle:
            return sum(1 for line in handle if line.strip())
    return spec.data.max_documents


def data_stages_in_one_process(spec: JobSpec) -> bool:
    return spec.method != "full_parameter" and fits_one_process(train_documents(spec))


def data_stages_pending(spec: JobSpec) -> bool:
    paths = JobPaths(spec.output_dir)
    return any(not is_done(paths, stage) for stage in SETUP_STAGES)


def start_data_worker(spec: JobSpec):
    """The data worker, placed like the Ray Data path's embedding actors: one cheap node (and its GPU, if any).
    Its stages are idempotent: on a lost node it restarts elsewhere and the call in flight runs again."""
    tier, retries = spec.resources.submodel_tier, spec.resources.max_failures
    return ray.remote(DataWorker).options(**task_options(spec, tier), max_restarts=retries,
                                          max_task_retries=retries).remote(tier)


# Ray Train's preemption watcher, one actor per trainer polling the GCS for drained nodes, is what carries a
# drain to `ray.train.get_preemption_info()`. The simulated cluster turns it off (`cluster._quiet_ray_env`); a job
# with a spot tier turns it back on for its trainers, whose controllers inherit the launcher's environment, and
# polls every second rather than Ray's 5, so that a 30 s notice leaves the checkpoint 29 of them.
def preemption_watch_env() -> dict[str, str]:
    return {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1",
            "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": os.environ.get("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")}


def start_launcher(spec: JobSpec | None = None):
    options = on_driver_node()
    tiers = (spec.resources.submodel_tier, spec.resources.finetune_tier) if spec is not None else ()
    if any(tier.spot for tier in tiers):
        options["runtime_env"] = {"env_vars": preemption_watch_env()}
    return TrainerLauncher.options(**options).remote()


@dataclass
class Helpers:
    launcher: Any
    data_worker: Any | None


_started: dict[str, Helpers] = {}


def start_helpers(spec: JobSpec) -> Helpers:
    """The job's launcher and, when its data stages will run in one process and some are left, the data worker."""
    worker = start_data_worker(spec) if data_stages_in_one_process(spec) and data_stages_pending(spec) else None
    return Helpers(start_launcher(spec), worker)


def stop_helpers(helpers: Helpers | None) -> None:
    """Kill helpers that no job will use (it failed before its first stage)."""
    for actor in (helpers.launcher, helpers.data_worker) if helpers is not None else ():
        if actor is not None:
            ray.kill(actor)


def prestart_job(spec: JobSpec) -> Helpers:
    """`start_helpers`, kept for the job's runner to `take_prestarted` (in this process)."""
    helpers = _started[str(Path(spec.output_dir).resolve())] = start_helpers(spec)
    return helpers


def take_prestarted(spec: JobSpec) -> Helpers | None:
    return _started.pop(str(Path(spec.output_dir).resolve()), None)
