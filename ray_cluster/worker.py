"""The Ray Train worker: a plain `train_func(config)` that runs one moedisco training stage.

    TorchTrainer(train_func, train_loop_config={"spec": spec, "stage": "submodel", "expert": 2, "events": queue}, ...)

The loop is moedisco's own (`pipeline.stage_warmup`, `stage_submodel`, `stage_finetune`, `stage_full_parameter`);
this module only
connects it to Ray Train through `TrainHooks`:
- every checkpoint moedisco writes is reported with `ray.train.report(..., checkpoint=...)`, and a restarted worker
  first puts the latest reported checkpoint back into the run folder, so `train` resumes from it;
- every metrics line says which node and `gpu_type` ran it (`TrainHooks.extra`);
- rank 0 pushes progress records to the job's event queue, and at every checkpoint reads the driver's stop flag;
- with several workers the model is wrapped for data parallelism.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train

# moedisco's training modules (torch, transformers) are imported inside the functions: Ray Train's controller
# unpickles `train_func`, and should not pay seconds of imports for a loop it never runs.


def replica_paths(root: Path, rank: int):
    """A data-parallel replica's view of the job folder: its copy of the final model goes to scratch, so that only
    rank 0 writes OUTPUT/final (moedisco's fine-tune saves the model on every rank)."""
    from moedisco.pipeline import JobPaths

    @dataclass(frozen=True)
    class ReplicaPaths(JobPaths):
        final = property(lambda self: self.root / "runs" / "replicas" / f"final_rank{rank}")

    return ReplicaPaths(root)


def run_dir_of(paths, stage: str, expert: int | None) -> Path:
    return paths.submodel(expert) if stage == "submodel" else paths.run(stage)


def node_identity(label_key: str) -> dict:
    context = ray.get_runtime_context()
    return {"node": context.get_node_id(), "gpu_type": context.get_node_labels().get(label_key), "pid": os.getpid()}


def restore_reported_checkpoint(checkpoint: ray.train.Checkpoint | None, run_dir: Path) -> int | None:
    """Copy Ray's latest reported checkpoint into `run_dir/checkpoints/` unless the folder already has it.

    On shared storage the folder usually still holds it; on a replacement node with an empty disk it does not.
    """
    from moedisco.train import checkpoint_dirs, finished_result

    if checkpoint is None or finished_result(run_dir) is not None:
        return None
    with checkpoint.as_directory() as folder:
        step = json.loads((Path(folder) / "trainer_state.json").read_text())["step"]
        target = run_dir / "checkpoints" / f"step_{step:08d}"  # moedisco's checkpoint folder name
        if target not in checkpoint_dirs(run_dir):
            shutil.copytree(folder, target, dirs_exist_ok=True)
    return step


class RayTrainBridge:
    """Builds the `TrainHooks` that connect moedisco's loop to Ray Train on one worker."""

    def __init__(self, config: dict, rank: int, world_size: int):
        self.events, self.stage, self.expert = config.get("events"), config["stage"], config.get("expert")
        self.rank, self.world_size = rank, world_size
        self.identity = node_identity(config["spec"].resources.label_key)
        self.latest_checkpoint: tuple[int, Path] | None = None

    def hooks(self):
        from moedisco.train import TrainHooks

        return TrainHooks(on_progress=self.on_progress, on_checkpoint=self.on_checkpoint,
                          should_stop=self.at_checkpoint_boundary, wrap_model=self.wrap_model,
                          rank=self.rank, world_size=self.world_size, extra={**self.identity, "rank": self.rank})

    def push(self, event: dict) -> None:
        if self.events is not None and self.rank == 0:
            self.events.push.remote({"stage": self.stage, "expert": self.expert, "time": time.time(), **event})

    def on_progress(self, record: dict) -> None:
        self.push({"event": "progress", **record})

    def on_checkpoint(self, step: int, folder: Path) -> None:
        self.latest_checkpoint = (step, folder)

    def at_checkpoint_boundary(self) -> bool:
        # moedisco polls `should_stop` on every rank right after each checkpoint, and only rank 0 gets
        # `on_checkpoint`; `ray.train.report` is a barrier that every rank must reach, so it is called here.
        step, checkpoint = None, None
        if self.rank == 0 and self.latest_checkpoint is not None:
            step, folder = self.latest_checkpoint
            checkpoint = ray.train.Checkpoint.from_directory(str(folder))
        ray.train.report({"step": step, **self.identity}, checkpoint=checkpoint)
        return self.stop_requested()

    def stop_requested(self) -> bool:
        """The driver's cancel flag, read by rank 0 and shared, so that all ranks stop at the same step."""
        stop = [self.events is not None and self.rank == 0 and ray.get(self.events.stop_requested.remote())]
        if self.world_size > 1:
            import torch.distributed

            torch.distributed.broadcast_object_list(stop, src=0)
        return stop[0]

    def wrap_model(self, model):
        if self.world_size == 1:
            return model
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)


def _run_stage(config: dict, paths, hooks) -> dict:
    from moedisco import pipeline as stages
    from moedisco.metrics import MetricsWriter

    spec, stage, metrics = config["spec"], config["stage"], MetricsWriter(paths.metrics)
    if stage == "submodel":
        return stages.stage_submodel(spec, paths, config["expert"], metrics, hooks, progress=False,
                                     round_index=config.get("round"))
    if stage == "warmup":
        return stages.stage_warmup(spec, paths, metrics, hooks, progress=False)
    if stage == "finetune":
        return stages.stage_finetune(spec, paths, metrics, hooks, progress=False)
    return stages.stage_full_parameter(spec, paths, metrics, hooks, progress=False)


def train_func(config: dict) -> dict:
    """Runs on every Ray Train worker; returns rank 0's stage summary (the trainer's `Result.return_value`)."""
    spec, stage, expert = config["spec"], config["stage"], config.get("expert")
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    from moedisco.pipeline import JobPaths

    paths = JobPaths(spec.output_dir) if rank == 0 else replica_paths(spec.output_dir, rank)
    bridge = RayTrainBridge(config, rank, world_size)
    started = time.time()
    bridge.push({"event": "worker_started", **bridge.identity})
    if rank == 0:
        restore_reported_checkpoint(ray.train.get_checkpoint(), run_dir_of(paths, stage, expert))
    if world_size > 1:
        import torch.distributed

        torch.distributed.barrier()  # no rank may read the run folder before rank 0 has restored it
    from moedisco.train import StopRequested

    try:
        summary = _run_stage(config, paths, bridge.hooks())
    except StopRequested:
        return {"stopped": True}  # a clean return, so Ray Train shuts the trainer down instead of retrying it
    return {**summary, **bridge.identity, "num_nodes": world_size, "started_at": started, "finished_at": time.time()}
