"""Ray Train trainers for the training stages, pinned to a tier by node label, all run side by side.

    launcher = TrainerLauncher.options(**on_driver_node()).remote()   # ray_cluster.prestart
    ref = launcher.fit.remote(build_trainer(spec, Task("submodel", expert=2), events=queue))   # -> stage summary

Each trainer is a Ray Train trainer (a `TorchTrainer`; with a single worker a `DataParallelTrainer`, see below)
whose workers carry `label_selector={label_key: tier.label}`, whose `RunConfig` is
`storage_path=<resources.storage_path or output_dir>, name=<job>/<stage>[_<expert>]`, and whose `FailureConfig`
restarts a failed worker group up to `resources.max_failures` times, from the latest reported checkpoint.

A `TorchTrainer` adds one thing to a `DataParallelTrainer`: a torch.distributed process group across its workers,
which data parallelism needs (`workers_per_expert` > 1, several fine-tune devices). A single worker never uses it,
and setting it up costs the trainer's controller a torch import and its worker a process group: a trainer of a
trivial function took 9.6 s to start and finish as a `TorchTrainer` and 6.4 s without (two busy cores). So
single-worker trainers go without it (`DataParallelTrainer` is Ray Train's base class, a DeveloperAPI).

All of a job's `fit()` calls run as threads of one launcher actor on the driver's node (Ray Train V2 runs `fit` off
the main thread, as Tune does), so submitting every expert at once costs one process, not one per expert; the job
starts it with itself (`ray_cluster.prestart`), so its imports are done by the first trainer. Ray then places each
trainer's workers as cheap nodes free up, or as the autoscaler adds them: the elastic part. While too few nodes are
free a trainer's placement group stays pending; Ray Train V2 retries such a start timeout without charging
`max_failures`. Killing the launcher kills the trainers' controllers, which own the workers: a cancel.
"""

from __future__ import annotations

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from moedisco.config.spec import JobSpec
from moedisco.job.registry import STAGE, Task
from moedisco.planning.estimate import stage_devices
from ray_cluster.placement import label_selector, run_name, storage_root, tier_of, tier_simulated, worker_resources
from ray_cluster.worker import train_func


def num_workers(spec: JobSpec, stage: str) -> int:
    # The devices the memory planner planned the stage for: a cheap-tier trainer (a submodel, the shared warm-up)
    # uses `workers_per_expert` workers, the fine-tune one per device of its tier. Decided by the stage, not by
    # comparing tiers, which are equal when both are configured alike.
    return stage_devices(spec, STAGE[stage].train_config, sharded=True)[0]


def scaling_config(spec: JobSpec, stage: str) -> ScalingConfig:
    """The tier's declared need per worker (`placement.worker_resources`): a cheap pod or a simulated node holds
    one worker, so no two experts share a one-GPU node."""
    tier = tier_of(spec, stage)
    resources = worker_resources(tier)
    return ScalingConfig(num_workers=num_workers(spec, stage), use_gpu="GPU" in resources,
                         resources_per_worker=resources, label_selector=label_selector(spec, tier))


def torch_config(spec: JobSpec, stage: str) -> TorchConfig:
    # Ray Train picks NCCL whenever workers hold GPUs; a simulated tier's GPUs are logical and its workers train
    # on the CPU (`placement.prepare_worker`), where only gloo works.
    return TorchConfig(backend="gloo" if tier_simulated(spec, tier_of(spec, stage)) else None)


def build_trainer(spec: JobSpec, task: Task, events=None, owner: str | None = None) -> DataParallelTrainer:
    """The trainer of one training task (a submodel's synchronisation round, the warm-up, the fine-tune)."""
    train_cfg = getattr(spec, STAGE[task.stage].train_config)
    run_config = RunConfig(
        name=run_name(spec, task.stage, task.expert, task.round), storage_path=str(storage_root(spec)),
        failure_config=FailureConfig(max_failures=spec.resources.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=train_cfg.keep_checkpoints),
    )
    config = {"spec": spec, "task": task, "events": events, "owner": owner}
    scaling = scaling_config(spec, task.stage)
    if num_workers(spec, task.stage) == 1:
        return DataParallelTrainer(train_func, train_loop_config=config, scaling_config=scaling,
                                   run_config=run_config)
    return TorchTrainer(train_func, train_loop_config=config, scaling_config=scaling, run_config=run_config,
                        torch_config=torch_config(spec, task.stage))
