"""The helper processes a job on Ray needs, started before its driver has imported the stages, so that their
start-ups and imports overlap the driver's own.

    prestart_job(spec)                       # e.g. the service's job actor, first thing
    helpers = take_prestarted(spec)          # RayExecutor: the handles started above, else None
    helpers = start_helpers(spec)            # RayExecutor, when nothing was started ahead

The helpers are the `TrainerLauncher`, the actor whose threads run the job's `trainer.fit()` calls
(`ray_cluster.trainers`) and which imports torch as it starts rather than when the first trainer is unpickled, and,
for a job whose data stages run in one process, its data worker (`ray_cluster.data.data_worker`). Light to import on
purpose (Ray and the spec only). A started helper belongs to the process that started it: if that process ends, Ray
ends the helpers with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from moedisco.config.spec import JobSpec
from ray_cluster.data.data_worker import data_stages_in_one_process, data_stages_pending, start_data_worker
from ray_cluster.placement import on_driver_node
from ray_cluster.preemption import watch_env

MAX_CONCURRENT_TRAINERS = 256


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


def start_launcher(spec: JobSpec | None = None):
    """The launcher; for a job whose trainers may land on spot nodes, with Ray Train's preemption watcher polling
    every second, which its trainers' controllers inherit (`ray_cluster.preemption.watch_env`)."""
    options = on_driver_node()
    env = watch_env(spec, ray.nodes()) if spec is not None else None
    if env is not None:
        options["runtime_env"] = {"env_vars": env}
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
