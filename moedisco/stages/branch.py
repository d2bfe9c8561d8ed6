"""Independent training (paper sec. 3.2): each submodel trains on its own cluster, after an optional shared warm-up.

    stage_warmup(run)     # the whole corpus, one dense submodel (upcycled into every expert) or the full MoE
    stage_submodel(run)   # submodel k (its group of experts) on cluster k, for one synchronisation round

A submodel is trained with moedisco's loop (`moedisco.training.loop`): resumable from its checkpoints, and stopped at
the end of each round but the last so that `moedisco.stages.sync` can average the shared parameters.
"""

from __future__ import annotations

from pathlib import Path

from moedisco.config.spec import JobSpec
from moedisco.job.layout import JobPaths, stage_result
from moedisco.job.registry import round_ends, submodel_task
from moedisco.models.architecture import parameter_roles, read_config
from moedisco.models.upcycle import upcycle_submodel
from moedisco.models.weights import WEIGHTS_FILE, save_weights
from moedisco.stages import split
from moedisco.stages.cluster import cluster_eval_sequence, train_source
from moedisco.stages.finetune import enable_router_loss, load_moe
from moedisco.stages.prepare import eval_sequences
from moedisco.stages.stage_run import StageRun
from moedisco.training.checkpoint import checkpoint_dirs
from moedisco.training.heldout import evaluate_loss
from moedisco.training.loop import finished_result, train


def branch_point(spec: JobSpec, paths: JobPaths) -> Path:
    """The MoE the submodels branch from: the warmed-up one when there is a shared warm-up."""
    return paths.branched if spec.branch.warmup_steps > 0 and spec.method == "moe_disco" else paths.source



def stage_warmup(run: StageRun) -> dict:
    """Train on the whole corpus before branching: one dense submodel, upcycled so that every expert starts as its
    FFN (`warmup_model: dense`), or the full MoE with its router (`moe`).

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
    result = train(model, train_NL, eval_sequences(spec, paths), cfg, run.train_context(spec.seed))
    if dense:
        upcycle_submodel(paths.source, paths.run("warmup") / WEIGHTS_FILE, paths.branched)
    else:
        model.config.output_router_logits = False
        save_weights(model, paths.branched)
    return result.__dict__



def stage_submodel(run: StageRun) -> dict:
    """Train submodel `expert` on its cluster; its weights end in submodels/<expert>/model.safetensors.

    With `sync_rounds` > 1 this runs once per round (`run.round_index`): every round but the last stops at a
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
    group = spec.model.experts_per_submodel
    model = split.load_submodel(branch_point(spec, paths), expert, group)
    if group > 1:  # its router learns to share the group's tokens, kept balanced as the fine-tune keeps them
        model = enable_router_loss(model, spec.model.router_aux_loss_coef)
    train_NL = train_source(spec, paths, expert)
    roles = parameter_roles(read_config(paths.source))
    # An extension's new experts learn around the base's backbone when it stays frozen (`extend.shared`).
    frozen = spec.method == "extend" and spec.extend.shared == "frozen"
    scale = 0.0 if frozen else spec.branch.shared_lr_scale
    context = run.train_context(spec.seed + expert, lr_scale=lambda name: scale if roles[name] == "shared" else 1.0,
                            save_second_moment=spec.merge.weighting == "fisher" and not frozen,
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
