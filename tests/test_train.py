"""The training loop's own contracts: schedules, frozen blocks, checkpoints that are complete or absent."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moedisco.config import TrainConfig
from moedisco.metrics import MetricsWriter
from moedisco.split import parameter_roles
from moedisco.train import checkpoint_dirs, lr_multiplier, train
from tests.conftest import tiny_hf_config


def test_schedules():
    cosine = TrainConfig(steps=100, warmup_ratio=0.1, schedule="cosine")
    assert lr_multiplier(cosine, 0) == pytest.approx(0.1) and lr_multiplier(cosine, 9) == pytest.approx(1.0)
    assert lr_multiplier(cosine, 99) < 0.01
    assert lr_multiplier(TrainConfig(steps=100, warmup_ratio=0.0, schedule="constant"), 77) == 1.0


def test_zero_lr_scale_freezes_the_shared_backbone(tmp_path):
    config = tiny_hf_config("qwen2_moe")
    roles = parameter_roles(config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    seqs = torch.randint(0, 97, (16, 16))
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, eval_every=3, checkpoint_every=3)
    train(model, seqs, None, cfg, tmp_path / "run", stage="submodel", seed=0,
          metrics=MetricsWriter(tmp_path / "m.jsonl"), progress=False,
          lr_scale=lambda name: 0.0 if roles[name] == "shared" else 1.0)
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n, role in roles.items() if role == "shared")
    assert not torch.equal(before["model.layers.0.mlp.experts.down_proj"], after["model.layers.0.mlp.experts.down_proj"])


def test_a_partial_checkpoint_is_never_resumed_from(tmp_path):
    (tmp_path / "checkpoints" / "step_00000008.partial").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000004").mkdir()
    (tmp_path / "checkpoints" / "step_00000004" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoints" / "step_00000012").mkdir()  # no trainer_state.json: a crash mid-save
    assert [d.name for d in checkpoint_dirs(tmp_path)] == ["step_00000004"]


def test_second_moments_are_saved_and_zero_for_unseen_tokens(tmp_path):
    from safetensors.torch import load_file

    from moedisco.train import SECOND_MOMENT_FILE

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_hf_config("qwen2_moe"))
    seqs = torch.randint(0, 50, (16, 16))  # tokens 50.. never occur: their embedding rows get no gradient
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, eval_every=3, checkpoint_every=3)
    train(model, seqs, None, cfg, tmp_path / "run", stage="submodel", seed=0,
          metrics=MetricsWriter(tmp_path / "m.jsonl"), progress=False, save_second_moment=True)
    moments = load_file(tmp_path / "run" / SECOND_MOMENT_FILE)
    assert set(moments) == {name for name, p in model.named_parameters()}
    assert all((m >= 0).all() for m in moments.values())
    embedding = moments["model.embed_tokens.weight"].float()
    assert embedding[:50].sum() > 0 and torch.count_nonzero(embedding[50:]) == 0
