"""The Ray Train worker: a plain `train_func(config)` that runs one moedisco training stage.

    TorchTrainer(train_func, train_loop_config={"spec": spec, "task": Task("submodel", 2), "events": queue}, ...)

The stage is moedisco's own (`moedisco.runner.execute.run_stage` of the task); this module only connects it to Ray
Train through `TrainHooks`. Every checkpoint moedisco writes is reported to Ray Train, and a restarted worker first
puts the latest reported one back into the run folder, so that training resumes from it; every metrics line says
which node, `gpu_type` and GPUs ran it; every rank says which node it holds and from when to when (a `NodeUse`,
as it starts and as it returns); rank 0 pushes progress to the job's event queue and reads the driver's stop
flag at every checkpoint; after every step every rank asks Ray Train whether its node is being preempted (drained
by the cloud or KubeRay's preStop), and if so checkpoints that step, within a second before the drain's deadline
(and `resources.notice_checkpoint_s`), and returns `{"preempted": True, "notice_checkpoint": ...}` (seconds, bytes,
whether it is on storage), so that the driver starts only this trainer again, from the newest checkpoint on storage,
counting a preemption rather than one of `max_failures`; with several workers the model is sharded over them (FSDP2).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
import ray.train

from moedisco.io.atomic import writing
from moedisco.io.storage import is_uri
from moedisco.job.events import WorkerStarted, progress_event
from moedisco.job.layout import ClaimLost, JobPaths, check_claim
from moedisco.stages.stage_run import StageRun
from moedisco.training.preemption import PreemptionNotice
from ray_cluster.node_uses import NodeUseReporter
from ray_cluster.placement import placement_tier, prepare_worker, storage_root

log = logging.getLogger(__name__)

# moedisco's training modules (torch, transformers) are imported inside the functions: Ray Train's controller
# unpickles `train_func`, and should not pay seconds of imports for a loop it never runs.


def replica_paths(root: Path, rank: int) -> JobPaths:
    """A data-parallel replica's view of the job folder: its copy of the final model goes to scratch, so that only
    rank 0 writes OUTPUT/final (moedisco's fine-tune saves the model on every rank)."""

    @dataclass(frozen=True)
    class ReplicaPaths(JobPaths):
        final = property(lambda self: self.root / "runs" / "replicas" / f"final_rank{rank}")

    return ReplicaPaths(root)


def node_identity(label_key: str) -> dict:
    context = ray.get_runtime_context()
    return {"node": context.get_node_id(), "gpu_type": context.get_node_labels().get(label_key), "pid": os.getpid()}


POINTER_FILE = "moedisco_checkpoint.json"
RETURN_S = 1.0  # of a drain's deadline, left for returning and reporting after the notice's checkpoint


def reportable_checkpoint(folder: Path, storage: Path | str, scratch: Path) -> Path:
    """What to hand `ray.train.report` for moedisco's checkpoint `folder`: the folder itself (Ray copies it to its
    storage) when it lies outside Ray's storage, else a small pointer written under `scratch`. A checkpoint that
    is already on the shared storage needs no second copy."""
    if is_uri(storage) or not folder.resolve().is_relative_to(Path(storage).resolve()):
        return folder  # Ray copies it (to object storage when `resources.storage_path` is a URI)
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / POINTER_FILE).write_text(json.dumps({"path": str(folder.resolve())}))
    return scratch


def restore_reported_checkpoint(checkpoint: ray.train.Checkpoint | None, run_dir: Path) -> int | None:
    """Put Ray's latest reported checkpoint back into `run_dir/checkpoints/` unless the folder already has it;
    returns its step.

    A pointer names a checkpoint on the shared storage, which a restarted worker finds where it was. A full copy
    (moedisco's folder was not on Ray's storage) is copied into a `.partial` folder renamed when complete, so an
    interrupted restore never looks like a checkpoint.
    """
    from moedisco.training.checkpoint import checkpoint_dir, checkpoint_dirs
    from moedisco.training.loop import finished_result

    if checkpoint is None or finished_result(run_dir) is not None:
        return None
    with checkpoint.as_directory() as folder:
        pointer = Path(folder) / POINTER_FILE
        if pointer.is_file():
            source = Path(json.loads(pointer.read_text())["path"])
            if source not in checkpoint_dirs(source.parent.parent):
                log.warning("reported checkpoint %s is gone; resuming from the newest one left", source)
                return None
            return json.loads((source / "trainer_state.json").read_text())["step"]
        step = json.loads((Path(folder) / "trainer_state.json").read_text())["step"]
        target = checkpoint_dir(run_dir, step)
        if target not in checkpoint_dirs(run_dir):
            with writing(target, one_writer=True) as partial:
                shutil.copytree(folder, partial)
    return step


def resume_step(run_dir: Path) -> int:
    """The step a training run in `run_dir` starts from: its newest checkpoint's, or the end when it finished."""
    from moedisco.training.checkpoint import checkpoint_dirs
    from moedisco.training.loop import finished_result

    done = finished_result(run_dir)
    if done is not None:
        return done.steps
    newest = checkpoint_dirs(run_dir)[-1:]
    return json.loads((newest[0] / "trainer_state.json").read_text())["step"] if newest else 0


class RayTrainBridge:
    """Builds the `TrainHooks` that connect moedisco's loop to Ray Train on one worker."""

    def __init__(self, config: dict, rank: int, world_size: int):
        self.events, self.task, spec = config.get("events"), config["task"], config["spec"]
        self.paths, self.runner_id = JobPaths(spec.output_dir), config.get("runner_id")
        self.rank, self.world_size = rank, world_size
        self.identity = node_identity(spec.resources.label_key)
        # The node's GPUs Ray gave this worker (logical ones too): what the ledger's row for it stands for.
        self.gpu_ids = [str(gpu) for gpu in ray.get_gpu_ids()]
        self.storage = storage_root(spec)
        self.latest_checkpoint: tuple[int, Path] | None = None
        self.notice = PreemptionNotice()
        self.notice_checkpoint_s = spec.resources.notice_checkpoint_s
        self.drain_deadline: float | None = None  # UNIX seconds: when the drained node goes

    def hooks(self):
        from moedisco.training.loop import TrainHooks

        return TrainHooks(on_progress=self.on_progress, on_checkpoint=self.on_checkpoint,
                          should_stop=self.at_checkpoint_boundary, wrap_model=self.wrap_model,
                          preempted=self.preempted, notice_seconds=self.notice_seconds,
                          before_write=lambda: check_claim(self.paths, self.runner_id),
                          rank=self.rank, world_size=self.world_size, extra={**self.identity, "rank": self.rank,
                                                                             "gpu_ids": self.gpu_ids})

    def push(self, event) -> None:
        if self.events is not None and self.rank == 0:
            self.events.push.remote(event)

    def started(self, resume_step: int | None) -> None:
        self.push(WorkerStarted(stage=self.task.stage, expert=self.task.expert, time=time.time(),
                                resume_step=resume_step, **self.identity))

    def preempted(self) -> bool:
        info = ray.train.get_preemption_info()
        if info is not None:
            self.drain_deadline = info.deadline_ms / 1000 if info.deadline_ms else None
            deadline = f", deadline {info.deadline_ms / 1000:.0f}" if info.deadline_ms else ""
            self.notice.notify(f"node {self.identity['node']} is being preempted{deadline}")
        if self.world_size == 1:
            return self.notice()
        # Ranks on other nodes are not told; the checkpoint that follows is collective (FSDP2), so every rank
        # must stop at the same step: any rank's notice stops them all.
        import torch
        import torch.distributed

        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1.0 if self.notice() else 0.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and not self.notice():
            self.notice.notify("another worker of this trainer is being preempted")
        return bool(flag.item())

    def notice_seconds(self) -> float | None:
        """What the notice's checkpoint may take: `resources.notice_checkpoint_s`, and no more than the drain's
        deadline leaves for returning; None: no bound (neither is set)."""
        limit = self.notice_checkpoint_s
        if self.drain_deadline is not None:
            left = max(0.0, self.drain_deadline - time.time() - RETURN_S)
            limit = left if limit is None else min(limit, left)
        return limit

    def on_progress(self, record: dict) -> None:
        self.push(progress_event({**record, "round": self.task.round, "time": time.time()}))

    def on_checkpoint(self, step: int, folder: Path) -> None:
        self.latest_checkpoint = (step, folder)

    def at_checkpoint_boundary(self) -> bool:
        # moedisco polls `should_stop` on every rank right after each checkpoint, and only rank 0 gets
        # `on_checkpoint`; `ray.train.report` is a barrier that every rank must reach, so it is called here.
        self.report_checkpoint()
        return self.stop_requested()

    def report_checkpoint(self) -> None:
        step, checkpoint = None, None
        with tempfile.TemporaryDirectory() as scratch:  # report copies the checkpoint before it returns
            if self.rank == 0 and self.latest_checkpoint is not None:
                step, folder = self.latest_checkpoint
                reported = reportable_checkpoint(folder, self.storage, Path(scratch) / f"step_{step}")
                checkpoint = ray.train.Checkpoint.from_directory(str(reported))
            ray.train.report({"step": step, **self.identity}, checkpoint=checkpoint)

    def stop_requested(self) -> bool:
        """The driver's cancel flag, read by rank 0 and shared, so that all ranks stop at the same step."""
        stop = [self.events is not None and self.rank == 0 and ray.get(self.events.stop_requested.remote())]
        if self.world_size > 1:
            import torch.distributed

            torch.distributed.broadcast_object_list(stop, src=0)
        return stop[0]

    def wrap_model(self, model):
        """Several workers shard the model with FSDP2 (`moedisco.training.fsdp`): each holds 1/world of its weights,
        gradients and optimizer state, so a submodel too big for one card trains over several."""
        if self.world_size == 1:
            return model
        from moedisco.training.fsdp import shard_model

        return shard_model(model)


def select_worker_gpu() -> None:
    """Make this worker's GPU the current CUDA device: several workers on one node all see its GPUs, and
    `device: auto` (`cuda`) and FSDP2's device mesh use the current one."""
    import torch

    if torch.cuda.is_available():
        import ray.train.torch

        torch.cuda.set_device(ray.train.torch.get_device())


def train_func(config: dict) -> dict:
    """Runs on every Ray Train worker; returns rank 0's stage summary (the trainer's `Result.return_value`). Every
    rank says it holds its node from here to its return (`NodeUse`); a killed worker's use the driver closes."""
    started = time.time()
    with NodeUseReporter(config.get("events"), config["task"].ids).held(start=started):
        return train(config, started)


def train(config: dict, started: float) -> dict:
    spec, task = config["spec"], config["task"]
    prepare_worker(placement_tier(spec, task.stage))
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    paths = JobPaths(spec.output_dir) if rank == 0 else replica_paths(spec.output_dir, rank)
    bridge = RayTrainBridge(config, rank, world_size)
    resumed_from = None
    if rank == 0:
        run_dir = paths.run_dir(task.stage, task.expert)
        restore_reported_checkpoint(ray.train.get_checkpoint(), run_dir)
        resumed_from = resume_step(run_dir)
    if world_size > 1:
        import torch.distributed

        select_worker_gpu()
        torch.distributed.barrier()  # no rank may read the run folder before rank 0 has restored it
    if rank == 0:  # after the barrier: every rank's open node use is on the queue before the driver hears that
        # this worker group started (`ray_cluster.tracking.NodeUses.workers_started` closes the group before it)
        bridge.started(resumed_from)
    from moedisco.job.metrics import MetricsWriter
    from moedisco.runner.execute import run_stage
    from moedisco.training.loop import Preempted, StopRequested

    try:
        summary = run_stage(StageRun(spec, paths, MetricsWriter(paths.metrics), task, bridge.hooks(), progress=False))
    except Preempted as stop:
        bridge.report_checkpoint()
        written = asdict(stop.checkpoint) if stop.checkpoint is not None else None
        return {"preempted": True, "step": stop.step, "reason": bridge.notice.reason, "notice_checkpoint": written,
                **bridge.identity, "started_at": started, "finished_at": time.time()}
    except StopRequested:
        return {"stopped": True}  # a clean return, so Ray Train shuts the trainer down instead of retrying it
    except ClaimLost:
        return {"stopped": True, "claim_lost": True}  # the job is another runner's: retrying cannot help
    return {**summary, **bridge.identity, "num_nodes": world_size, "started_at": started, "finished_at": time.time()}
