"""The one training loop: submodels, the fine-tune and the full-parameter baseline all run through `train`.

    context = TrainContext(run_dir, stage="submodel", expert=2, seed=spec.seed,
                           metrics=MetricsWriter(OUTPUT / "metrics.jsonl"), spec_yaml=spec.to_yaml())
    result = train(model, train_NL, eval_NL, spec.submodel, context)

AdamW with a constant/cosine/linear/warmup-stable-decay schedule (`moedisco.training.schedule`), gradient
clipping, and the memory measures of `TrainConfig` (micro-batches, activation checkpointing, precision, 8-bit or
offloaded optimizer: `moedisco.training.memory`). Checkpoints (`moedisco.training.checkpoint`) land in `run_dir/checkpoints/` every
`checkpoint_every` steps; calling `train` again on the same `run_dir` resumes from the newest one, and
returns at once if the run already finished. Data order is a pure function of (seed, step), so a resumed run sees
exactly the batches it would have seen.

Legend: N = sequences, L = sequence length, B = batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from moedisco.config.spec import TrainConfig
from moedisco.io.atomic import write_atomically
from moedisco.io.token_shards import batch_source
from moedisco.models.weights import unique_state_dict
from moedisco.training import fsdp
from moedisco.training.balance import BiasBalancer
from moedisco.training.checkpoint import (
    SECOND_MOMENT_FILE,
    checkpoint_bytes,
    checkpoint_dirs,
    load_training_state,
    load_weights,
    save_checkpoint,
)
from moedisco.training.heldout import evaluate_loss, router_load
from moedisco.training.memory import PeakMemory, amp_dtype, measures_of, prepare_model, resolve_device
from moedisco.training.optimizer import make_optimizer, second_moments
from moedisco.training.preemption import NoticeCheckpoint, within_deadline
from moedisco.training.schedule import lr_multiplier

log = logging.getLogger(__name__)
RESULT_FILE = "result.json"
@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    eval_loss: float | None
    resumed_from: int = 0
    device: str = "cpu"


@dataclass
class TrainHooks:
    """Optional callbacks through which a runner (Ray, the service) watches and steers a run."""

    on_progress: Callable[[dict], None] | None = None  # every logged step: the metrics record
    on_checkpoint: Callable[[int, Path], None] | None = None  # after each checkpoint is written
    should_stop: Callable[[], bool] | None = None  # polled each step; True stops after a checkpoint
    preempted: Callable[[], bool] | None = None  # polled after every step; True: checkpoint it, raise `Preempted`
    notice_seconds: Callable[[], float | None] | None = None  # how long that checkpoint may take; None: no bound
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None  # e.g. DistributedDataParallel
    before_write: Callable[[], None] | None = None  # before each metrics line, checkpoint and the final weights;
    # raises to stop a run whose job folder another runner took over (`moedisco.job.layout.ClaimLost`)
    rank: int = 0
    world_size: int = 1
    extra: dict = field(default_factory=dict)  # added to every metrics record (node, gpu_type, ...)

    def check_write(self) -> None:
        if self.before_write is not None:
            self.before_write()


class MetricsSink(Protocol):
    """Where the loop logs its records (`moedisco.job.metrics.MetricsWriter`)."""

    def write(self, record: dict) -> None: ...


@dataclass
class TrainContext:
    """One run of the loop: where it writes, what it is, who watches it; how it steps is its `TrainConfig`."""

    run_dir: Path  # checkpoints/, then the final weights and result.json
    stage: str
    seed: int  # with the step, fixes the data order and the initial RNG state
    metrics: MetricsSink
    expert: int | None = None
    spec_yaml: str | None = None  # saved next to every checkpoint
    hooks: TrainHooks | None = None
    progress: bool = True  # a progress bar
    lr_scale: Callable[[str], float] | None = None  # per parameter name; 0 freezes it
    save_second_moment: bool = False  # AdamW's second moments next to the weights (`second_moments`)
    stop_at: int | None = None  # end this call at that step with a checkpoint (a synchronisation round)
    meter: PeakMemory | None = None  # the stage's peak memory, logged with every metrics record

    def __post_init__(self) -> None:
        self.hooks = self.hooks or TrainHooks()

    @property
    def label(self) -> str:
        return self.stage if self.expert is None else f"{self.stage}[{self.expert}]"


class StopRequested(RuntimeError):
    """Raised when `should_stop` asked the run to end early; its last checkpoint is on disk."""


class Preempted(StopRequested):
    """Raised when `TrainHooks.preempted` said the node is being taken back (`moedisco.training.preemption`): the run
    reached `step` and checkpointed it, within the notice's deadline when `checkpoint.durable`, and resumes from the
    newest checkpoint on storage (None: a stage without steps was stopped; a re-run redoes only its unfinished
    pieces)."""

    def __init__(self, message: str, step: int | None, checkpoint: NoticeCheckpoint | None = None):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


def finished_result(run_dir: Path) -> TrainResult | None:
    path = run_dir / RESULT_FILE
    return TrainResult(**json.loads(path.read_text())) if path.is_file() else None


def _local_batch(train_NL, step: int, cfg: TrainConfig, seed: int, hooks: TrainHooks) -> torch.Tensor:
    # `train_NL`: sequences in memory or a `token_shards.SequenceSource` reading them from disk by (seed, step).
    batch_BL = batch_source(train_NL).batch(step, cfg.batch_size, seed)
    return batch_BL[hooks.rank :: hooks.world_size]


def train(model, train_NL: torch.Tensor, eval_NL: torch.Tensor | None, cfg: TrainConfig,
          ctx: TrainContext) -> TrainResult:
    """Train `model` in place for `cfg.steps` steps, resuming from `ctx.run_dir` when it holds a checkpoint.

    `ctx.save_second_moment` also writes AdamW's bias-corrected second moments next to the weights (see
    `second_moments`), which the merge can use as each submodel's diagonal Fisher estimate.
    `ctx.stop_at` < `cfg.steps` ends the call at that step with a checkpoint there (with the second moments when
    `save_second_moment`) and no final weights: the learning-rate schedule stays that of `cfg.steps`, and a
    later call resumes from the checkpoint, which may have been edited in between (a synchronisation round).
    """
    if ctx.stop_at is not None and not 0 < ctx.stop_at <= cfg.steps:
        raise ValueError(f"stop_at {ctx.stop_at} is outside 1..{cfg.steps} (steps)")
    run_dir, hooks = ctx.run_dir, ctx.hooks
    done = finished_result(run_dir)
    if done is not None:
        model.load_state_dict(load_file(run_dir / "model.safetensors"), strict=False)
        return done
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    prepare_model(model, cfg, device)
    state = {"step": 0, "seconds": 0.0, "eval_loss": None}
    checkpoints = checkpoint_dirs(run_dir)
    if checkpoints:
        load_weights(checkpoints[-1], model)
    optimizer = make_optimizer(model, cfg, ctx.lr_scale)  # freezes what lr_scale zeroes before any wrapping
    net = hooks.wrap_model(model) if hooks.wrap_model else model
    if fsdp.is_sharded(model):  # fully_shard swapped the parameters for DTensors: the optimizer takes those
        optimizer = make_optimizer(model, cfg, ctx.lr_scale)
    if checkpoints:
        state = load_training_state(checkpoints[-1], model, optimizer)
    resumed_from = state["step"]
    torch.manual_seed(ctx.seed + resumed_from)
    loop = _Loop(net, model, optimizer, train_NL, eval_NL, cfg, ctx, device, state)
    end = ctx.stop_at or cfg.steps
    try:
        loop.run(end)
    finally:
        if loop.balancer is not None:
            loop.balancer.close()
    result = TrainResult(steps=state["step"], tokens=loop.tokens(state["step"]), seconds=state["seconds"],
                         eval_loss=state["eval_loss"], resumed_from=resumed_from, device=str(device))
    if end < cfg.steps:
        return result
    sharded = fsdp.is_sharded(model)
    if sharded or hooks.rank == 0:  # gathering a sharded model's weights and moments takes every rank
        weights = fsdp.full_state_dict(model) if sharded else unique_state_dict(model)
        moments = second_moments(model, optimizer) if ctx.save_second_moment else None

    def write_final() -> None:
        hooks.check_write()
        save_file(weights, run_dir / "model.safetensors", metadata={"format": "pt"})
        if moments is not None:
            save_file(moments, run_dir / SECOND_MOMENT_FILE, metadata={"format": "pt"})
        write_atomically(run_dir / RESULT_FILE, json.dumps(asdict(result)))  # the run's "done", so whole or absent
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)

    fsdp.on_rank_zero(model, hooks.rank, write_final)
    return result


def _micro_batches(batch_BL: torch.Tensor, micro_batch_size: int | None):
    """(micro-batch, is it the last) pairs covering `batch_BL` in order."""
    chunks = batch_BL.split(micro_batch_size or len(batch_BL))
    return [(chunk, index == len(chunks) - 1) for index, chunk in enumerate(chunks)]


class _Loop:
    """The step loop's state, split out of `train` so each piece stays small."""

    def __init__(self, net, model, optimizer, train_NL, eval_NL, cfg: TrainConfig, ctx: TrainContext, device,
                 state: dict):
        self.net, self.model, self.optimizer = net, model, optimizer
        self.train_NL, self.eval_NL, self.cfg, self.ctx = train_NL, eval_NL, cfg, ctx
        self.hooks, self.device, self.state = ctx.hooks, device, state
        self.amp = amp_dtype(cfg, device)
        self.router_counts: torch.Tensor | None = None
        self.balancer = BiasBalancer(model, cfg.router_bias_rate) if cfg.router_bias_rate > 0 else None

    def tokens(self, step: int) -> int:
        return step * self.cfg.batch_size * self.train_NL.shape[1]

    def run(self, end: int) -> None:
        """Steps up to `end`; an `end` short of `cfg.steps` is checkpointed (with moments if asked)."""
        cfg = self.cfg
        bar = tqdm(total=cfg.steps, initial=self.state["step"], desc=self.ctx.label, disable=not self.ctx.progress,
                   leave=False)
        losses: list[float] = []
        if self.state["step"] == 0 and self.eval_NL is not None:
            self._log(0, None)  # the curve starts at the untrained (or freshly merged) model
        while self.state["step"] < end:
            started = time.perf_counter()
            losses.append(fsdp.mean_over_ranks(self._step(self.state["step"]), self.model))
            self.state["step"] += 1
            self.state["seconds"] += time.perf_counter() - started
            bar.update(1)
            step = self.state["step"]
            if step % cfg.eval_every == 0 or step == cfg.steps:
                self._log(step, sum(losses) / len(losses))
                losses = []
            round_end = step == end < cfg.steps
            preempted = self.hooks.preempted is not None and self.hooks.preempted() and step < cfg.steps
            moments = round_end and self.ctx.save_second_moment
            if preempted:
                written = self._checkpoint_on_notice(moments)
                raise Preempted(f"{self.ctx.label} preempted at step {step}, "
                                f"{'checkpointed there' if written.durable else 'its checkpoint not in time'}",
                                step, written)
            if (step % cfg.checkpoint_every == 0 and step < cfg.steps) or round_end:
                self._checkpoint(moments)
                if self.hooks.should_stop and self.hooks.should_stop():
                    raise StopRequested(f"{self.ctx.label} stopped at step {step}")
        bar.close()

    def _step(self, step: int) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * lr_multiplier(self.cfg, step) * group.get("lr_scale", 1.0)
        batch_BL = _local_batch(self.train_NL, step, self.cfg, self.ctx.seed, self.hooks).to(self.device)
        self.net.train()
        loss = sum(self._accumulate(micro_BL, len(micro_BL) / len(batch_BL), last)
                   for micro_BL, last in _micro_batches(batch_BL, self.cfg.micro_batch_size))
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.balancer is not None:
            self.balancer.step()
        return loss

    def _accumulate(self, micro_BL: torch.Tensor, share: float, last: bool) -> float:
        """Forward and backward of one micro-batch, its loss weighted by its share of the batch: packed sequences
        have no padding, so the batch's mean token loss is the share-weighted sum of the micro-batches' means.
        (A router's load-balancing loss is a product of batch statistics, so it is computed per micro-batch.)"""
        # A DDP-wrapped model all-reduces gradients only on the last micro-batch of the step.
        sync = contextlib.nullcontext() if last or not hasattr(self.net, "no_sync") else self.net.no_sync()
        with sync:
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                outputs = self.net(input_ids=micro_BL, labels=micro_BL)
            (outputs.loss * share).backward()
        self._count_routes(outputs)
        return float(outputs.loss.detach()) * share

    def _count_routes(self, outputs) -> None:
        logits = getattr(outputs, "router_logits", None)
        if logits:
            counts = router_load(logits, self.model.config.num_experts_per_tok)
            self.router_counts = counts if self.router_counts is None else self.router_counts + counts

    def _log(self, step: int, train_loss: float | None) -> None:
        if self.eval_NL is not None:
            self.state["eval_loss"] = evaluate_loss(self.model, self.eval_NL, self.cfg.batch_size,
                                                    self.cfg.eval_batches, self.device, self.amp)
        record = {"stage": self.ctx.stage, "expert": self.ctx.expert, "step": step, "total_steps": self.cfg.steps,
                  "tokens": self.tokens(step), "loss": train_loss, "eval_loss": self.state["eval_loss"],
                  "seconds": round(self.state["seconds"], 3), "device": str(self.device), **self.hooks.extra}
        if self.ctx.meter is not None:
            record["peak_memory_gb"] = self.ctx.meter.peak_gb()
        record["memory_measures"] = measures_of(self.cfg)
        picked = self.balancer.take_load() if self.balancer is not None else None
        if picked is not None:  # a biased router picks by more than its logits: count what it picked
            self.router_counts = picked
        if self.router_counts is not None and self.router_counts.sum() > 0:
            record["router_load"] = (self.router_counts / self.router_counts.sum()).tolist()
        self.router_counts = None
        fsdp.on_rank_zero(self.model, self.hooks.rank, lambda: (self.hooks.check_write(),
                                                                    self.ctx.metrics.write(record)))
        if self.hooks.on_progress:
            self.hooks.on_progress(record)

    def _checkpoint(self, moments: bool = False) -> Path | None:
        ckpt = self._write_checkpoint(moments)
        if ckpt is not None and self.hooks.rank == 0 and self.hooks.on_checkpoint:
            self.hooks.on_checkpoint(self.state["step"], ckpt)
        return ckpt

    def _write_checkpoint(self, moments: bool) -> Path | None:
        """The checkpoint of this step; None on a replica that writes none (rank > 0, unsharded)."""
        rank = self.hooks.rank
        if rank != 0 and not fsdp.is_sharded(self.model):
            return None
        fsdp.on_rank_zero(self.model, rank, self.hooks.check_write)
        return save_checkpoint(self.ctx.run_dir, self.model, self.optimizer, dict(self.state),
                               self.ctx.spec_yaml, self.cfg.keep_checkpoints, moments, rank)

    def _checkpoint_on_notice(self, moments: bool) -> NoticeCheckpoint:
        """The checkpoint after a preemption notice, waited for at most `hooks.notice_seconds()`. A sharded one is
        written by every rank together, so it is not cut short here: Ray Train's drain deadline bounds it."""
        started, step = time.perf_counter(), self.state["step"]
        deadline_s = self.hooks.notice_seconds() if self.hooks.notice_seconds else None
        if fsdp.is_sharded(self.model):
            ckpt = self._write_checkpoint(moments)
        else:
            ckpt = within_deadline(lambda: self._write_checkpoint(moments), deadline_s)
        written = NoticeCheckpoint(step=step, durable=ckpt is not None, seconds=round(time.perf_counter() - started, 3),
                                   num_bytes=checkpoint_bytes(ckpt) if ckpt is not None else 0, deadline_s=deadline_s)
        if ckpt is not None and self.hooks.rank == 0 and self.hooks.on_checkpoint:
            self.hooks.on_checkpoint(step, ckpt)
        if self.hooks.rank == 0:
            log.warning("%s: checkpoint on the preemption notice at step %d %s in %.2f s (%d bytes, deadline %s s)",
                        self.ctx.label, step, "on storage" if written.durable else "NOT on storage",
                        written.seconds, written.num_bytes, deadline_s)
        return written
