"""Synchronisation rounds while submodels train (`branch.sync_rounds`; an addition to the paper's recipe).

    sync_round(roles, [OUTPUT / "submodels/0/checkpoints/step_00000025", ...], weights, fisher=True,
               out=OUTPUT / "sync/round_0.safetensors")

The paper's submodels meet once, at the merge. Trained on different clusters, their shared backbones drift apart,
and averaging them then costs more than the experts' specialisation gains: measured on the bundled corpus, merged
k-means submodels were worse than merged random ones. With R rounds, every submodel stops at the end of a round
with a checkpoint, their shared parameters are averaged exactly as the merge averages them (`merge.average_shared`)
and written back into each checkpoint, and each submodel resumes from it with its own optimizer state and its own
expert. This is periodic parameter averaging (local SGD, DiLoCo's outer step with plain averaging) restricted to
the backbone. Trainers exchange nothing directly: the average goes through the job's storage, like the merge.

The average is written to `out` first and applied after, so a sync interrupted half-way is finished by re-running
it: applying the same average twice is a no-op.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moedisco.merge import average_shared
from moedisco.split import WEIGHTS_FILE, Role
from moedisco.train import SECOND_MOMENT_FILE


def _save_atomically(tensors: dict[str, torch.Tensor], path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, partial, metadata={"format": "pt"})
    partial.replace(path)


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


def apply_backbone(shared: dict[str, torch.Tensor], checkpoint: Path) -> float:
    """Overwrite the shared tensors of one checkpoint's weights; returns the squared distance it moved them."""
    state = load_file(checkpoint / WEIGHTS_FILE)
    moved = sum(float((state[name].float() - tensor.float()).pow(2).sum()) for name, tensor in shared.items())
    state.update(shared)
    _save_atomically(state, checkpoint / WEIGHTS_FILE)
    return moved


def sync_round(roles: dict[str, Role], checkpoints: Sequence[Path], weights: Sequence[float], fisher: bool,
               out: Path) -> dict:
    """Average the submodels' backbones in `checkpoints` and write the average back into each of them.

    Returns `divergence`: sqrt(sum_k gamma_k ||theta_k - theta_avg||^2) / ||theta_avg|| over the shared
    parameters before the sync, how far the backbones had drifted apart in the round (0 after a repeated sync).
    """
    shared = backbone_average(roles, checkpoints, weights, fisher, out)
    moved = [apply_backbone(shared, checkpoint) for checkpoint in checkpoints]
    norm = math.sqrt(sum(float(tensor.float().pow(2).sum()) for tensor in shared.values()))
    spread = math.sqrt(sum(gamma * distance for gamma, distance in zip(weights, moved)))
    return {"divergence": spread / norm if norm > 0 else 0.0, "tensors": len(shared)}
