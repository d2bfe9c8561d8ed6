"""Global fine-tune of the merged MoE, and the full-parameter baseline (paper sec. 3.1.3 step 3, sec. 4).

    model, result = finetune(OUTPUT / "merged", train_NL, eval_NL, spec, TrainContext(run_dir, "finetune", ...))
    model, result = train_full_parameter(source_model, train_NL, eval_NL, spec, context)
    model, result = anneal(JobPaths(OUTPUT), step=200)   # a stopped wsd fine-tune's checkpoint, decayed
    summary = stage_finetune(run); summary = stage_full_parameter(run)     # the stages: final/ written

Both train every parameter of the full MoE with the router's load-balancing loss switched on
(`output_router_logits`, weighted by `router_aux_loss_coef`), so the router learns to spread tokens over experts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from moedisco.config.loading import load_saved_spec
from moedisco.config.spec import JobSpec
from moedisco.io.atomic import partial_of, put_in_place
from moedisco.job.layout import JobPaths
from moedisco.job.metrics import MetricsWriter
from moedisco.stages import prepare
from moedisco.stages.cluster import train_source
from moedisco.stages.prepare import eval_sequences
from moedisco.stages.stage_run import StageRun
from moedisco.training import fsdp
from moedisco.training.checkpoint import checkpoint_dir
from moedisco.training.loop import TrainContext, TrainResult, finished_result, train
from moedisco.training.schedule import decayed_from


def load_moe(folder: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)


def enable_router_loss(model: PreTrainedModel, coef: float) -> PreTrainedModel:
    model.config.output_router_logits = True
    model.config.router_aux_loss_coef = coef
    # Some architectures copy the coefficient onto the model at construction time.
    if hasattr(model, "router_aux_loss_coef"):
        model.router_aux_loss_coef = coef
    return model


def finetune(merged: Path, train_NL: torch.Tensor, eval_NL: torch.Tensor, spec: JobSpec,
             ctx: TrainContext) -> tuple[PreTrainedModel, TrainResult]:
    model = enable_router_loss(load_moe(merged), spec.model.router_aux_loss_coef)
    return model, train(model, train_NL, eval_NL, spec.finetune, ctx)


def anneal(paths: JobPaths, step: int, progress: bool = False) -> tuple[PreTrainedModel, TrainResult]:
    """The fine-tune's checkpoint at `step` of its stable phase (a `wsd` schedule), decayed as a fine-tune of
    `decayed_from(spec.finetune, step)` steps would have: the model that stopping there would deliver. Uses the
    job's saved spec (the measures its fine-tune trained with); trained in `OUTPUT/anneal/step_N/` from a copy of
    the checkpoint, its metrics there, so the job's own run is untouched. An unsharded fine-tune's checkpoint only
    (a sharded one keeps its optimizer state per rank)."""
    spec = load_saved_spec(paths.spec)
    if spec.method != "moe_disco":  # an extension's fine-tune mixes corpora and may train the router alone
        raise ValueError(f"anneal: {paths.root} is a `{spec.method}` job; only a moe_disco fine-tune is annealed")
    cfg = decayed_from(spec.finetune, step)
    cfg = cfg.model_copy(update={"eval_every": cfg.steps, "checkpoint_every": cfg.steps})  # evaluated at its end
    run_dir = paths.anneal(step)
    start = checkpoint_dir(run_dir, step)
    if finished_result(run_dir) is None and not start.is_dir():
        partial = partial_of(start)
        shutil.copytree(checkpoint_dir(paths.run_dir("finetune"), step), partial)
        put_in_place(partial, start)  # whole or absent: `train` resumes from it
    ctx = TrainContext(run_dir, "finetune", spec.seed, MetricsWriter(run_dir / "metrics.jsonl"), progress=progress)
    return finetune(paths.merged, train_source(spec, paths), eval_sequences(spec, paths), spec.model_copy(
        update={"finetune": cfg}), ctx)


def train_full_parameter(model: PreTrainedModel, train_NL: torch.Tensor, eval_NL: torch.Tensor, spec: JobSpec,
                         ctx: TrainContext) -> tuple[PreTrainedModel, TrainResult]:
    model = enable_router_loss(model, spec.model.router_aux_loss_coef)
    return model, train(model, train_NL, eval_NL, spec.full_parameter, ctx)


def save_final(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> Path:
    """The job's deliverable: a standard Hugging Face model folder with its tokenizer. A sharded model's weights
    are gathered (every rank calls this) and written by rank 0 alone."""
    model.config.output_router_logits = False
    if fsdp.is_sharded(model):
        state = fsdp.full_state_dict(model)
        if not state:
            return folder
        model.save_pretrained(folder, state_dict=state)
    else:
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def stage_finetune(run: StageRun) -> dict:
    spec, paths = run.spec, run.paths
    train_NL = train_source(spec, paths)
    model, result = finetune(paths.merged, train_NL, eval_sequences(spec, paths), spec,
                             run.train_context(spec.seed))
    save_final(model, prepare.load_tokenizer(paths.tokenizer), paths.final)
    return result.__dict__



def stage_full_parameter(run: StageRun) -> dict:
    spec, paths = run.spec, run.paths
    train_NL = train_source(spec, paths)
    model, result = train_full_parameter(load_moe(paths.source), train_NL, eval_sequences(spec, paths), spec,
                                         run.train_context(spec.seed))
    save_final(model, prepare.load_tokenizer(paths.tokenizer), paths.final)
    return result.__dict__
