"""Synchronisation rounds: the backbone average written back into every submodel's checkpoint, experts untouched."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from moedisco.config.loading import build_spec
from moedisco.job.metrics import read_metrics
from moedisco.models.architecture import parameter_roles
from moedisco.models.weights import WEIGHTS_FILE, save_weights, unique_state_dict
from moedisco.runner.job_runner import run_job
from moedisco.stages.split import load_submodel
from moedisco.stages.sync import BACKBONE, MOMENTUM, OuterStep, sync_round
from moedisco.training.checkpoint import SECOND_MOMENT_FILE
from moedisco.training.loop import StopRequested
from tests.conftest import tiny_hf_config, tiny_spec_dict

EMBED, EXPERT = "model.embed_tokens.weight", "model.layers.0.mlp.experts.down_proj"


def _checkpoints(tmp_path, moments: bool = False):
    """Two submodel checkpoints of a tiny MoE whose shared parameters and experts were moved differently."""
    config = tiny_hf_config("qwen2_moe")
    torch.manual_seed(0)
    save_weights(AutoModelForCausalLM.from_config(config), tmp_path / "source")
    folders = []
    for k in range(2):
        sub = load_submodel(tmp_path / "source", k)
        with torch.no_grad():
            for param in sub.parameters():
                param.add_(torch.randn_like(param) * (k + 1))
        folder = tmp_path / f"sub{k}" / "checkpoints" / "step_00000004"
        folder.mkdir(parents=True)
        save_file(unique_state_dict(sub), folder / WEIGHTS_FILE)
        if moments:
            fisher = {name: torch.ones_like(p) for name, p in sub.named_parameters()}
            fisher[EMBED][0, 0] = 1e6 if k == 0 else 1e-6  # only submodel 0 was sensitive to this element
            save_file({n: t.to(torch.bfloat16) for n, t in fisher.items()}, folder / SECOND_MOMENT_FILE)
        folders.append(folder)
    return parameter_roles(config), folders


def test_sync_writes_the_weighted_backbone_average_into_every_checkpoint(tmp_path):
    roles, folders = _checkpoints(tmp_path)
    before = [load_file(f / WEIGHTS_FILE) for f in folders]
    result = sync_round(roles, folders, [0.25, 0.75], fisher=False, out=tmp_path / "sync" / "round_0.safetensors")
    after = [load_file(f / WEIGHTS_FILE) for f in folders]
    shared = [name for name in before[0] if roles[name] == "shared"]
    assert EMBED in shared and result["tensors"] == len(shared)
    for name in shared:
        expected = 0.25 * before[0][name] + 0.75 * before[1][name]
        torch.testing.assert_close(after[0][name], expected, msg=name)
        assert torch.equal(after[0][name], after[1][name])
    for k in range(2):  # experts and routers are never averaged
        assert all(torch.equal(after[k][n], before[k][n]) for n in before[k] if roles[n] != "shared")
    assert result["divergence"] > 0
    # Re-running an interrupted sync finishes it; on synced checkpoints it changes nothing.
    again = sync_round(roles, folders, [0.25, 0.75], fisher=False, out=tmp_path / "sync" / "round_0.safetensors")
    assert again["divergence"] == 0.0
    assert all(torch.equal(load_file(f / WEIGHTS_FILE)[EMBED], after[0][EMBED]) for f in folders)


def test_fisher_sync_keeps_what_the_sensitive_submodel_learned(tmp_path):
    roles, folders = _checkpoints(tmp_path, moments=True)
    before = [load_file(f / WEIGHTS_FILE)[EMBED] for f in folders]
    sync_round(roles, folders, [0.5, 0.5], fisher=True, out=tmp_path / "sync.safetensors")
    synced = load_file(folders[1] / WEIGHTS_FILE)[EMBED]
    assert synced[0, 0] == pytest.approx(float(before[0][0, 0]), rel=1e-3)
    torch.testing.assert_close(synced[0, 1], (before[0][0, 1] + before[1][0, 1]) / 2)


def test_sync_names_the_missing_checkpoint(tmp_path):
    roles, folders = _checkpoints(tmp_path)
    (folders[1] / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=str(folders[1] / WEIGHTS_FILE)):
        sync_round(roles, folders, [0.5, 0.5], fisher=False, out=tmp_path / "sync.safetensors")
    with pytest.raises(FileNotFoundError, match=SECOND_MOMENT_FILE):
        sync_round(roles, folders[:1], [1.0], fisher=True, out=tmp_path / "sync.safetensors")


def test_nesterov_sync_takes_diloco_outer_steps_and_carries_its_momentum(tmp_path):
    roles, folders = _checkpoints(tmp_path)
    start = load_file(tmp_path / "source" / WEIGHTS_FILE)[EMBED]
    locals_0 = [load_file(f / WEIGHTS_FILE)[EMBED] for f in folders]
    outer_0 = OuterStep(0.7, 0.9, tmp_path / "source" / WEIGHTS_FILE, tmp_path / "sync" / "outer_0.safetensors")
    sync_round(roles, folders, [0.5, 0.5], fisher=False, out=tmp_path / "sync" / "round_0.safetensors", outer=outer_0)
    delta_0 = start - (locals_0[0] + locals_0[1]) / 2  # the pseudo-gradient; no momentum before round 0
    theta_1 = start - 0.7 * (delta_0 + 0.9 * delta_0)
    assert all(torch.allclose(load_file(f / WEIGHTS_FILE)[EMBED], theta_1, atol=1e-5) for f in folders)
    # Round 1: the local models moved on from theta_1; the momentum remembers round 0's pseudo-gradient.
    for k, folder in enumerate(folders):
        state = load_file(folder / WEIGHTS_FILE)
        state[EMBED] = theta_1 + (k + 1) * 0.01
        save_file(state, folder / WEIGHTS_FILE)
    outer_1 = OuterStep(0.7, 0.9, outer_0.out, tmp_path / "sync" / "outer_1.safetensors")
    sync_round(roles, folders, [0.5, 0.5], fisher=False, out=tmp_path / "sync" / "round_1.safetensors", outer=outer_1)
    delta_1 = torch.full_like(theta_1, -0.015)
    momentum_1 = 0.9 * delta_0 + delta_1
    saved = load_file(outer_1.out)
    torch.testing.assert_close(saved[MOMENTUM + EMBED], momentum_1)
    torch.testing.assert_close(saved[BACKBONE + EMBED], theta_1 - 0.7 * (delta_1 + 0.9 * momentum_1))
    assert torch.equal(load_file(folders[0] / WEIGHTS_FILE)[EMBED], saved[BACKBONE + EMBED])


def test_nesterov_with_lr_1_and_no_momentum_is_the_plain_average(tmp_path):
    roles, folders = _checkpoints(tmp_path)
    before = [load_file(f / WEIGHTS_FILE)[EMBED] for f in folders]
    outer = OuterStep(1.0, 0.0, tmp_path / "source" / WEIGHTS_FILE, tmp_path / "outer.safetensors")
    sync_round(roles, folders, [0.25, 0.75], fisher=False, out=tmp_path / "avg.safetensors", outer=outer)
    torch.testing.assert_close(load_file(folders[1] / WEIGHTS_FILE)[EMBED], 0.25 * before[0] + 0.75 * before[1])


def test_a_resumed_nesterov_job_continues_the_outer_momentum_bit_for_bit(tmp_path):
    def spec_in(folder):
        return build_spec(tiny_spec_dict(folder, branch={"sync_rounds": 3, "outer_optimizer": "nesterov"},
                                         model={"num_experts": 2, "num_experts_per_tok": 1},
                                         data={"max_documents": 160}, submodel={"steps": 6, "checkpoint_every": 2},
                                         finetune={"steps": 1}))

    whole, resumed = spec_in(tmp_path / "whole"), spec_in(tmp_path / "resumed")
    out = resumed.output_dir
    with pytest.raises(StopRequested):  # the data stages once, for both jobs
        run_job(whole, progress=False, should_stop=lambda: (whole.output_dir / "source").is_dir())
    shutil.copytree(whole.output_dir, out)
    run_job(whole, progress=False)
    with pytest.raises(StopRequested):  # stops with round 0's outer state on disk, round 1's sync still to come
        run_job(resumed, progress=False,
                should_stop=lambda: (out / "submodels" / "1" / "checkpoints" / "step_00000004").is_dir())
    assert (out / "sync" / "outer_0.safetensors").is_file() and not (out / "sync" / "outer_1.safetensors").exists()
    run_job(resumed, progress=False)
    assert not (out / "sync" / "outer_0.safetensors").exists()  # only the newest outer state is kept
    for k in (0, 1):
        ours, theirs = (load_file(root / "submodels" / str(k) / WEIGHTS_FILE) for root in (out, whole.output_dir))
        assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    syncs = [r["divergence"] for r in read_metrics(out / "metrics.jsonl", "sync")]
    assert syncs == [r["divergence"] for r in read_metrics(whole.output_dir / "metrics.jsonl", "sync")]
