"""Ray Train trainers for the training stages, pinned to their tier by node label, all run side by side.

    launcher = TrainerLauncher.options(**on_driver_node()).remote()   # ray_cluster.prestart
    ref = launcher.fit.remote(build_trainer(spec, Task("submodel", expert=2), events=queue))   # -> stage summary

Each trainer's workers carry the tier's label selector and declared resources; its `RunConfig` is
`storage_path=<resources.storage_path or output_dir>, name=<job_key>/<task.marker>` (`placement.run_name`), and its
`FailureConfig` restarts a failed worker group up to `resources.max_failures` times from the latest reported
checkpoint, and one whose node was preempted before it returned up to `resources.max_preemptions` times
(`ray_cluster.preemption`). A trainer of several workers is a `TorchTrainer`, whose torch.distributed process group
data parallelism needs; a single worker never uses one, so its trainer is the base `DataParallelTrainer` (a
DeveloperAPI), which starts faster. All of a job's `fit()` calls run as threads of one launcher actor on the driver's
node (Ray Train V2 runs `fit` off the main thread), so submitting every expert at once costs one process; Ray places
each trainer's workers as nodes of its tier free up or an autoscaler adds them (a pending placement group retries
without charging `max_failures`), and killing the launcher kills the trainers' controllers, which own the workers:
a cancel.
"""

from __future__ import annotations

from ray.train import CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from moedisco.config.spec import JobSpec
from moedisco.job.registry import STAGE, Task
from moedisco.planning.memory_plan import stage_devices
from ray_cluster.placement import (
    label_selector,
    placement_tier,
    run_name,
    storage_root,
    tier_simulated,
    worker_resources,
)
from ray_cluster.preemption import failure_config
from ray_cluster.worker import train_func


def num_workers(spec: JobSpec, stage: str) -> int:
    # The devices the memory planner planned the stage for: a cheap-tier trainer (a submodel, the shared warm-up)
    # uses `workers_per_expert` workers, the fine-tune one per device of its tier. Decided by the stage, not by
    # comparing tiers, which are equal when both are configured alike.
    return stage_devices(spec, STAGE[stage].train_config, sharded=True)[0]


def scaling_config(spec: JobSpec, stage: str) -> ScalingConfig:
    """The tier's declared need per worker (`placement.worker_resources`): a cheap pod or a simulated node holds
    one worker, so no two experts share a one-GPU node."""
    tier = placement_tier(spec, stage)
    resources = worker_resources(tier)
    return ScalingConfig(num_workers=num_workers(spec, stage), use_gpu="GPU" in resources,
                         resources_per_worker=resources, label_selector=label_selector(spec, tier))


def torch_config(spec: JobSpec, stage: str) -> TorchConfig:
    # Ray Train picks NCCL whenever workers hold GPUs; a simulated tier's GPUs are logical and its workers train
    # on the CPU (`placement.prepare_worker`), where only gloo works.
    return TorchConfig(backend="gloo" if tier_simulated(spec, placement_tier(spec, stage)) else None)


def build_trainer(spec: JobSpec, task: Task, events=None, runner_id: str | None = None) -> DataParallelTrainer:
    """The trainer of one training task (a submodel's synchronisation round, the warm-up, the fine-tune)."""
    train_cfg = getattr(spec, STAGE[task.stage].train_config)
    run_config = RunConfig(
        name=run_name(spec, task), storage_path=str(storage_root(spec)),
        failure_config=failure_config(spec.resources),
        checkpoint_config=CheckpointConfig(num_to_keep=train_cfg.keep_checkpoints),
    )
    config = {"spec": spec, "task": task, "events": events, "runner_id": runner_id}
    scaling = scaling_config(spec, task.stage)
    if num_workers(spec, task.stage) == 1:
        return DataParallelTrainer(train_func, train_loop_config=config, scaling_config=scaling,
                                   run_config=run_config)
    return TorchTrainer(train_func, train_loop_config=config, scaling_config=scaling, run_config=run_config,
                        torch_config=torch_config(spec, task.stage))
