"""The stage functions: what each stage of a job does, in this process (the stages are declared in
`moedisco.stages`, which names these functions; the runners call them through `moedisco.stage_run.run_stage`).

    summary = stage_merge(StageRun(spec, JobPaths(spec.output_dir), metrics, task=Task("merge")))

Each takes a `StageRun` (the spec, the job folder, the metrics writer, the task, the training hooks), reads its
inputs from and writes its outputs to the job folder (`moedisco.layout`), and returns its summary, which the runner
keeps as the stage's marker. A training stage called again resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from moedisco import cluster, data, embed, merge, split, sync
from moedisco.corpus import chunks, iter_texts, train_source
from moedisco.config import JobSpec
from moedisco.evaluate import evaluate_loss
from moedisco.finetune import enable_router_loss, finetune, load_moe, save_final, train_full_parameter
from moedisco.layout import JobPaths, stage_result
from moedisco.shards import TokenShard
from moedisco.stage_run import StageRun
from moedisco.stages import round_ends, submodel_task
from moedisco.train import SECOND_MOMENT_FILE, TrainContext, checkpoint_dir, checkpoint_dirs, finished_result, train
from moedisco.upcycle import upcycle_submodel

log = logging.getLogger(__name__)


# --- data: the stages are in `moedisco.corpus`; these read what they wrote --------------------------------------


def load_corpus(paths: JobPaths, split_name: str) -> TokenShard:
    return TokenShard.load(paths.tokens(split_name))


def eval_sequences(spec: JobSpec, paths: JobPaths) -> torch.Tensor:
    return load_corpus(paths, "eval").pack(spec.data.sequence_length)


# --- model ------------------------------------------------------------------------------------------------------


def stage_source(run: StageRun) -> dict:
    tokenizer = data.load_tokenizer(run.paths.tokenizer)
    model = split.build_source_moe(run.spec, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    split.save_weights(model, run.paths.source)
    return {"arch": model.config.model_type, "parameters": sum(p.numel() for p in model.parameters())}


def branch_point(spec: JobSpec, paths: JobPaths) -> Path:
    """The MoE the submodels branch from: the warmed-up one when there is a shared warm-up."""
    return paths.branched if spec.branch.warmup_steps > 0 else paths.source


def train_context(run: StageRun, seed: int, **options) -> TrainContext:
    """The training loop's context for this stage's task: its run folder, metrics, hooks and `options`."""
    task = run.task
    return TrainContext(run_dir=run.paths.run_dir(task.stage, task.expert), stage=task.stage, expert=task.expert,
                        seed=seed, metrics=run.metrics, spec_yaml=run.spec.to_yaml(), hooks=run.hooks,
                        progress=run.progress, meter=run.meter, **options)


def stage_warmup(run: StageRun) -> dict:
    """Train on the whole corpus before branching: one dense submodel, upcycled so that every expert starts as its
    FFN (`branch.warmup_model: dense`), or the full MoE with its router (`moe`).

    Submodels branched from one common, already-trained model stay close enough in weight space that averaging
    their backbones costs little (Branch-Train-MiX branches from a seed model for the same reason).
    """
    spec, paths = run.spec, run.paths
    cfg = spec.submodel.model_copy(update={"steps": spec.branch.warmup_steps,
                                           "lr": spec.branch.warmup_lr or spec.submodel.lr})
    train_NL = train_source(spec, paths)
    dense = spec.branch.warmup_model == "dense"
    model = split.load_submodel(paths.source, 0) if dense else enable_router_loss(
        load_moe(paths.source), spec.model.router_aux_loss_coef)
    result = train(model, train_NL, eval_sequences(spec, paths), cfg, train_context(run, spec.seed))
    if dense:
        upcycle_submodel(paths.source, paths.run("warmup") / split.WEIGHTS_FILE, paths.branched)
    else:
        model.config.output_router_logits = False
        split.save_weights(model, paths.branched)
    return result.__dict__


def eval_assignments(spec: JobSpec, paths: JobPaths) -> np.ndarray:
    """Cluster of every held-out document, by nearest centroid (computed once, cached next to the clusters)."""
    cached = paths.clusters / "eval_assignments.npy"
    if not cached.is_file():
        embedder, clusters = embed.Embedder(spec.embed), cluster.ClusterResult.load(paths.clusters)
        # A chunk at a time: a large corpus's held-out share is more text than one process should hold.
        assigned = [clusters.assign(embedder(texts)) for texts in chunks(iter_texts(paths.texts("eval")))]
        # Written aside and renamed: concurrent submodel trainers may fill the cache at the same time.
        partial = cached.with_name(f"eval_assignments.{os.getpid()}.npy")
        np.save(partial, np.concatenate(assigned) if assigned else np.zeros(0, dtype=np.int64))
        partial.replace(cached)
    return np.load(cached)


def cluster_eval_sequence(spec: JobSpec, paths: JobPaths, expert: int) -> torch.Tensor:
    """Held-out sequences of cluster `expert` (empty when the cluster has too few held-out tokens)."""
    doc_ids = np.flatnonzero(eval_assignments(spec, paths) == expert)
    try:
        return load_corpus(paths, "eval").pack(spec.data.sequence_length, doc_ids)
    except data.DataError:
        return torch.zeros(0, spec.data.sequence_length, dtype=torch.long)


def cluster_eval_sequences(spec: JobSpec, paths: JobPaths) -> list[torch.Tensor]:
    return [cluster_eval_sequence(spec, paths, k) for k in range(spec.model.num_experts)]


def stage_submodel(run: StageRun) -> dict:
    """Train submodel `expert` on its cluster; its weights end in submodels/<expert>/model.safetensors.

    With `branch.sync_rounds` > 1 this runs once per round (`run.round_index`): every round but the last stops at a
    checkpoint at the round's end, for `stage_sync`. `seconds` is this round's training time.
    """
    spec, paths, expert, round_index = run.spec, run.paths, run.task.expert, run.round_index
    rounds = spec.branch.sync_rounds
    if not 0 <= round_index < rounds:
        raise ValueError(f"round {round_index} out of range for branch.sync_rounds = {rounds}")
    last = round_index == rounds - 1
    run_dir = paths.submodel(expert)
    if round_index > 0 and finished_result(run_dir) is None and not checkpoint_dirs(run_dir):
        raise FileNotFoundError(f"submodel {expert} has no checkpoint in {run_dir} to start round {round_index} "
                                "from; a later round never starts over from the branch point")
    model = split.load_submodel(branch_point(spec, paths), expert)
    train_NL = train_source(spec, paths, expert)
    roles = split.parameter_roles(split.read_config(paths.source))
    scale = spec.branch.shared_lr_scale
    context = train_context(run, spec.seed + expert, lr_scale=lambda name: scale if roles[name] == "shared" else 1.0,
                            save_second_moment=spec.merge.weighting == "fisher",
                            stop_at=None if last else round_ends(spec)[round_index])
    result = train(model, train_NL, eval_sequences(spec, paths), spec.submodel, context)
    before = (stage_result(paths, submodel_task(spec, expert, round_index - 1).marker)["train_seconds_total"]
              if round_index > 0 else 0.0)
    summary = {"expert": expert, "round": round_index, "total_steps": spec.submodel.steps,
               "sequences": len(train_NL), **result.__dict__,
               "train_seconds_total": result.seconds, "seconds": max(0.0, result.seconds - before)}
    if last:
        own_NL = cluster_eval_sequence(spec, paths, expert)
        summary["cluster_eval_loss"] = evaluate_loss(model, own_NL, spec.submodel.batch_size,
                                                     spec.submodel.eval_batches,
                                                     next(model.parameters()).device) if len(own_NL) else None
    return summary


def stage_sync(run: StageRun) -> dict:
    """Average the submodels' shared parameters at the end of the task's round (see `moedisco.sync`)."""
    spec, paths, round_index = run.spec, run.paths, run.task.round
    started = time.perf_counter()
    step = round_ends(spec)[round_index]
    checkpoints = [checkpoint_dir(paths.submodel(k), step) for k in range(spec.model.num_experts)]
    for expert, checkpoint in enumerate(checkpoints):
        newest = checkpoint_dirs(paths.submodel(expert))[-1:]
        if newest != [checkpoint]:  # averaging anything else would resume the next round from unsynced weights
            found = newest[0].name if newest else "none"
            raise ValueError(f"submodel {expert}'s newest checkpoint is {found}, not {checkpoint.name} where round "
                             f"{round_index} ends: the job's submodel.steps or branch.sync_rounds changed")
    weights, fisher = shared_weighting(spec, paths)
    roles = split.parameter_roles(split.read_config(paths.source))
    result = sync.sync_round(roles, checkpoints, weights, fisher, paths.sync_average(round_index),
                             outer_step(spec, paths, round_index))
    seconds = time.perf_counter() - started
    run.metrics.write({"stage": "sync", "round": round_index, "step": step, "divergence": result["divergence"],
                       "seconds": seconds, "device": "cpu"})
    return {"round": round_index, "step": step, **result, "seconds": seconds, "device": "cpu"}


def outer_step(spec: JobSpec, paths: JobPaths, round_index: int) -> sync.OuterStep | None:
    """`branch.outer_optimizer`'s step for this round: None for the plain average."""
    branch = spec.branch
    if branch.outer_optimizer == "average":
        return None
    previous = (paths.outer_state(round_index - 1) if round_index > 0
                else branch_point(spec, paths) / split.WEIGHTS_FILE)
    return sync.OuterStep(branch.outer_lr, branch.outer_momentum, previous, paths.outer_state(round_index))


def shared_weighting(spec: JobSpec, paths: JobPaths) -> tuple[list[float], bool]:
    """gamma_k of the shared-parameter average (merge and sync alike), and whether it is Fisher-weighted."""
    sizes = cluster.ClusterResult.load(paths.clusters).sizes
    fisher = spec.merge.weighting == "fisher"
    return merge.averaging_weights(sizes, "samples" if fisher else spec.merge.weighting), fisher


def stage_merge(run: StageRun) -> dict:
    spec, paths = run.spec, run.paths
    started = time.perf_counter()
    weights, fisher = shared_weighting(spec, paths)
    files = [paths.submodel(k) / split.WEIGHTS_FILE for k in range(spec.model.num_experts)]
    moments = [paths.submodel(k) / SECOND_MOMENT_FILE for k in range(spec.model.num_experts)] if fisher else None
    missing = [str(path) for path in moments or [] if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"merge.weighting is 'fisher' but {', '.join(missing)} do not exist: submodels "
                                "save their second moments only when trained with that setting; re-run them")
    merge.merge_submodels(branch_point(spec, paths), files, weights, spec.merge.router_init, paths.merged,
                          seed=spec.seed, fisher=moments)
    if spec.merge.router_init == "centroid":  # one decoder layer at a time, then only the router bytes rewritten
        samples = [train_source(spec, paths, k).head(spec.merge.centroid_sequences)
                   for k in range(spec.model.num_experts)]
        merge.patch_tensors(paths.merged, merge.centroid_router_rows(paths.merged, samples))
    data.load_tokenizer(paths.tokenizer).save_pretrained(paths.merged)
    cfg = spec.finetune  # evaluated one decoder layer at a time too: the merge never holds the whole MoE
    eval_loss, oracle = merge.merged_losses(paths.merged, eval_sequences(spec, paths),
                                            cluster_eval_sequences(spec, paths), cfg.batch_size, cfg.eval_batches)
    seconds = time.perf_counter() - started
    run.metrics.write({"stage": "merge", "step": 0, "eval_loss": eval_loss, "oracle_eval_loss": oracle,
                       "weights": weights, "seconds": seconds, "device": "cpu"})
    return {"weights": weights, "eval_loss": eval_loss, "oracle_eval_loss": oracle, "seconds": seconds}


def stage_finetune(run: StageRun) -> dict:
    spec, paths = run.spec, run.paths
    train_NL = train_source(spec, paths)
    model, result = finetune(paths.merged, train_NL, eval_sequences(spec, paths), spec,
                             train_context(run, spec.seed))
    save_final(model, data.load_tokenizer(paths.tokenizer), paths.final)
    return result.__dict__


def stage_full_parameter(run: StageRun) -> dict:
    spec, paths = run.spec, run.paths
    train_NL = train_source(spec, paths)
    model, result = train_full_parameter(load_moe(paths.source), train_NL, eval_sequences(spec, paths), spec,
                                         train_context(run, spec.seed))
    save_final(model, data.load_tokenizer(paths.tokenizer), paths.final)
    return result.__dict__


def stage_evaluate(run: StageRun) -> dict:
    """Downstream tasks (spec section `evaluate`) on final/, and on `evaluate.baseline` when set; writes
    OUTPUT/evaluation.json. lm-eval is imported only here: a job without the section never loads it."""
    from moedisco.downstream import evaluate_models

    spec, paths, cfg = run.spec, run.paths, run.spec.evaluate
    started = time.perf_counter()
    models = {spec.method: paths.final, **({"baseline": cfg.baseline} if cfg.baseline is not None else {})}
    record = evaluate_models(models, cfg)
    seconds = time.perf_counter() - started
    paths.evaluation.write_text(json.dumps(record, indent=1))
    run.metrics.write({"stage": "evaluate", "step": 0, "scores": record["models"], "seconds": seconds})
    return {"scores": record["models"], "seconds": seconds}
