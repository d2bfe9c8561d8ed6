"""Synchronisation rounds: the backbone average written back into every submodel's checkpoint, experts untouched."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from moedisco.split import WEIGHTS_FILE, load_submodel, parameter_roles, save_weights, unique_state_dict
from moedisco.sync import sync_round
from moedisco.train import SECOND_MOMENT_FILE
from tests.conftest import tiny_hf_config

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
