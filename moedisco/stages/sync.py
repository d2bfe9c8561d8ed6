"""Synchronisation rounds while submodels train (`branch.sync_rounds`; an addition to the paper's recipe).

    sync_round(roles, [OUTPUT / "submodels/0/checkpoints/step_00000025", ...], weights, fisher=True,
               out=OUTPUT / "sync/round_0.safetensors")
    summary = stage_sync(run)      # the stage: round `run.task.round` of every submodel

Trained on different clusters, the submodels' shared backbones drift apart, and the merge pays for it. With R
rounds, every submodel stops at the end of a round with a checkpoint; their shared parameters are averaged as the
merge averages them (`moedisco.stages.merge.average_shared`), optionally through DiLoCo's Nesterov outer step
(`OuterStep`), and written back into each checkpoint; each submodel resumes with its own optimizer state and its
own expert. Trainers exchange nothing directly: the average goes through the job's storage, and it is written to
`out` before it is applied, so a sync interrupted half-way is finished by re-running it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moedisco.config.spec import JobSpec
from moedisco.io.atomic import writing
from moedisco.job.layout import JobPaths
from moedisco.job.registry import round_ends
from moedisco.models.architecture import Role, parameter_roles, read_config
from moedisco.models.weights import WEIGHTS_FILE
from moedisco.stages.branch import branch_point
from moedisco.stages.merge import average_shared, shared_weighting
from moedisco.stages.stage_run import StageRun
from moedisco.training.checkpoint import SECOND_MOMENT_FILE, checkpoint_dir, checkpoint_dirs


def _save_atomically(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with writing(path, one_writer=True) as partial:
        save_file(tensors, partial, metadata={"format": "pt"})


def backbone_average(roles: dict[str, Role], checkpoints: Sequence[Path], weights: Sequence[float], fisher: bool,
                     out: Path) -> dict[str, torch.Tensor]:
    """The averaged shared parameters of `checkpoints`, computed once and kept in `out`."""
    if out.is_file():
        return load_file(out)
    missing = [str(c / name) for c in checkpoints for name in ((WEIGHTS_FILE, SECOND_MOMENT_FILE) if fisher
                                                             else (WEIGHTS_FILE,)) if not (c / name).is_file()]
    if missing:
        raise FileNotFoundError(f"synchronisation needs {', '.join(missing)}: a submodel did not reach the end of "
                                "the round, or reached it with another merge.weighting")
    moments = [c / SECOND_MOMENT_FILE for c in checkpoints] if fisher else None
    shared = average_shared(roles, [c / WEIGHTS_FILE for c in checkpoints], weights, moments)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_atomically(shared, out)
    return shared


@dataclass(frozen=True)
class OuterStep:
    """DiLoCo's outer optimizer: where its state is and how it steps (`branch.outer_lr`, `branch.outer_momentum`)."""

    # Douillard et al. 2023: the pseudo-gradient delta = theta_prev - average(theta_k), theta_prev the backbone every
    # submodel started the round from, drives SGD with Nesterov momentum: m = mu m + delta,
    # theta = theta_prev - lr (delta + mu m); lr 1 and mu 0 are the plain average. theta and m (fp32) are written to
    # `out` once, before any checkpoint changes, so a re-run sync applies the same step and the next round reads
    # them back bit for bit. Round 0 starts from the branch point's backbone with m = 0. The merge after the last
    # round stays the plain average: an outer step is meant to be followed by inner steps that adapt the experts to
    # the extrapolated backbone, and after the merge only the router is initialised before the fine-tune.

    lr: float
    momentum: float
    previous: Path  # the state the round started from: the previous round's, or the branch point's weights
    out: Path  # this round's state


BACKBONE, MOMENTUM = "backbone/", "momentum/"  # key prefixes in an outer state file


def _start_of_round(previous: Path, names: Sequence[str]) -> tuple[dict, dict]:
    """theta_prev and m: an outer state file, or (round 0) the branch point's weights with no momentum yet."""
    with safe_open(previous, framework="pt") as handle:
        keys = set(handle.keys())
        if any(key.startswith(BACKBONE) for key in keys):
            return ({name: handle.get_tensor(BACKBONE + name) for name in names},
                    {name: handle.get_tensor(MOMENTUM + name) for name in names})
        return {name: handle.get_tensor(name).float() for name in names}, {}


def nesterov_backbone(average: dict[str, torch.Tensor], step: OuterStep) -> dict[str, torch.Tensor]:
    """The backbone after one Nesterov outer step towards `average`, computed once and kept in `step.out` with the
    new momentum (fp32, whatever the weights' dtype)."""
    if not step.out.is_file():
        theta, momentum = _start_of_round(step.previous, list(average))
        state = {}
        for name, mean in average.items():
            delta = theta[name] - mean.float()
            m = momentum[name].mul(step.momentum).add_(delta) if name in momentum else delta
            state[BACKBONE + name] = theta[name] - step.lr * (delta + step.momentum * m)
            state[MOMENTUM + name] = m
        step.out.parent.mkdir(parents=True, exist_ok=True)
        _save_atomically(state, step.out)
    return {name[len(BACKBONE):]: tensor for name, tensor in load_file(step.out).items()
            if name.startswith(BACKBONE)}


def apply_backbone(shared: dict[str, torch.Tensor], checkpoint: Path,
                   reference: dict[str, torch.Tensor] | None = None) -> float:
    """Overwrite the shared tensors of one checkpoint's weights; returns their squared distance from `reference`
    (default: `shared`, how far they moved) before."""
    state = load_file(checkpoint / WEIGHTS_FILE)
    reference = shared if reference is None else reference
    moved = sum(float((state[name].float() - tensor.float()).pow(2).sum()) for name, tensor in reference.items())
    state.update({name: tensor.to(state[name].dtype) for name, tensor in shared.items()})
    _save_atomically(state, checkpoint / WEIGHTS_FILE)
    return moved


def sync_round(roles: dict[str, Role], checkpoints: Sequence[Path], weights: Sequence[float], fisher: bool,
               out: Path, outer: OuterStep | None = None) -> dict:
    """Average the submodels' backbones in `checkpoints` and write the average back into each of them; with `outer`,
    write back the backbone after a Nesterov outer step towards the average instead.

    Returns `divergence`: sqrt(sum_k gamma_k ||theta_k - theta_avg||^2) / ||theta_avg|| over the shared
    parameters before the sync, how far the backbones had drifted apart in the round (0 after a repeated sync of
    plain averages).
    """
    average = backbone_average(roles, checkpoints, weights, fisher, out)
    shared = average if outer is None else nesterov_backbone(average, outer)
    moved = [apply_backbone(shared, checkpoint, average) for checkpoint in checkpoints]
    norm = math.sqrt(sum(float(tensor.float().pow(2).sum()) for tensor in average.values()))
    spread = math.sqrt(sum(gamma * distance for gamma, distance in zip(weights, moved)))
    return {"divergence": spread / norm if norm > 0 else 0.0, "tensors": len(shared)}


def stage_sync(run: StageRun) -> dict:
    """Average the submodels' shared parameters at the end of the task's round (see `moedisco.stages.sync`)."""
    spec, paths, round_index = run.spec, run.paths, run.task.round
    started = time.perf_counter()
    step = round_ends(spec)[round_index]
    checkpoints = [checkpoint_dir(paths.submodel(k), step) for k in range(spec.num_clusters)]
    for expert, checkpoint in enumerate(checkpoints):
        newest = checkpoint_dirs(paths.submodel(expert))[-1:]
        if newest != [checkpoint]:  # averaging anything else would resume the next round from unsynced weights
            found = newest[0].name if newest else "none"
            raise ValueError(f"submodel {expert}'s newest checkpoint is {found}, not {checkpoint.name} where round "
                             f"{round_index} ends: the job's submodel.steps or branch.sync_rounds changed")
    weights, fisher = shared_weighting(spec, paths)
    roles = parameter_roles(read_config(paths.source))
    result = sync_round(roles, checkpoints, weights, fisher, paths.sync_average(round_index),
                             outer_step(spec, paths, round_index))
    seconds = time.perf_counter() - started
    run.metrics.write({"stage": "sync", "round": round_index, "step": step, "divergence": result["divergence"],
                       "seconds": seconds, "device": "cpu"})
    return {"round": round_index, "step": step, **result, "seconds": seconds, "device": "cpu"}



def outer_step(spec: JobSpec, paths: JobPaths, round_index: int) -> OuterStep | None:
    """`branch.outer_optimizer`'s step for this round: None for the plain average."""
    branch = spec.branch
    if branch.outer_optimizer == "average":
        return None
    previous = (paths.outer_state(round_index - 1) if round_index > 0
                else branch_point(spec, paths) / WEIGHTS_FILE)
    return OuterStep(branch.outer_lr, branch.outer_momentum, previous, paths.outer_state(round_index))
