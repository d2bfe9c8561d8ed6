"""The training loop's own contracts: schedules, frozen blocks, checkpoints that are complete or absent."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from moedisco.config.spec import TrainConfig
from moedisco.job.metrics import MetricsWriter
from moedisco.models.architecture import parameter_roles
from moedisco.training.checkpoint import SECOND_MOMENT_FILE, checkpoint_dir, checkpoint_dirs
from moedisco.training.loop import TrainContext, train
from moedisco.training.schedule import decay_start, decayed_from, lr_multiplier
from tests.conftest import tiny_hf_config


def test_schedules():
    cosine = TrainConfig(steps=100, warmup_ratio=0.1, schedule="cosine")
    assert lr_multiplier(cosine, 0) == pytest.approx(0.1) and lr_multiplier(cosine, 9) == pytest.approx(1.0)
    assert lr_multiplier(cosine, 99) < 0.01
    assert lr_multiplier(TrainConfig(steps=100, warmup_ratio=0.0, schedule="constant"), 77) == 1.0
    wsd = TrainConfig(steps=100, warmup_ratio=0.1, schedule="wsd", decay_ratio=0.2)
    assert decay_start(wsd) == 80 and lr_multiplier(wsd, 79) == 1.0 and lr_multiplier(wsd, 80) < 1.0
    assert [lr_multiplier(wsd, s) for s in (80, 90)] == sorted([lr_multiplier(wsd, s) for s in (80, 90)], reverse=True)
    assert 0.0 < lr_multiplier(wsd, 99) < 0.03


@pytest.mark.parametrize("at_step", [3, 8, 13, 40])
def test_a_wsd_branch_decays_from_its_step_for_the_decay_share(at_step):
    cfg = TrainConfig(steps=50, warmup_ratio=0.06, schedule="wsd", decay_ratio=0.2)
    branch = decayed_from(cfg, at_step)
    assert decay_start(branch) == at_step and branch.steps - at_step == max(1, round(at_step / 4))
    # The branch is the run `cfg` was up to `at_step`: same warm-up, same stable rate.
    assert all(lr_multiplier(branch, s) == lr_multiplier(cfg, s) for s in range(at_step))
    assert lr_multiplier(branch, branch.steps - 1) < 0.3  # towards zero, a single decay step included


def test_a_decay_is_refused_outside_the_stable_phase():
    with pytest.raises(ValueError, match="only a wsd schedule"):
        decayed_from(TrainConfig(steps=50, schedule="cosine"), 10)
    with pytest.raises(ValueError, match=r"step 45 is not in the stable phase \(1..40\)"):
        decayed_from(TrainConfig(steps=50, warmup_ratio=0.02, schedule="wsd"), 45)


def test_zero_lr_scale_freezes_the_shared_backbone(tmp_path):
    config = tiny_hf_config("qwen2_moe")
    roles = parameter_roles(config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    seqs = torch.randint(0, 97, (16, 16))
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, eval_every=3, checkpoint_every=3)
    train(model, seqs, None, cfg, TrainContext(tmp_path / "run", stage="submodel", seed=0,
                                               metrics=MetricsWriter(tmp_path / "m.jsonl"), progress=False,
                                               lr_scale=lambda name: 0.0 if roles[name] == "shared" else 1.0))
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
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_hf_config("qwen2_moe"))
    seqs = torch.randint(0, 50, (16, 16))  # tokens 50.. never occur: their embedding rows get no gradient
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, eval_every=3, checkpoint_every=3)
    train(model, seqs, None, cfg, TrainContext(tmp_path / "run", stage="submodel", seed=0,
                                               metrics=MetricsWriter(tmp_path / "m.jsonl"), progress=False,
                                               save_second_moment=True))
    moments = load_file(tmp_path / "run" / SECOND_MOMENT_FILE)
    assert set(moments) == {name for name, p in model.named_parameters()}
    assert all((m >= 0).all() for m in moments.values())
    embedding = moments["model.embed_tokens.weight"].float()
    assert embedding[:50].sum() > 0 and torch.count_nonzero(embedding[50:]) == 0


def _train_tiny(run_dir, steps: int, stop_at: int | None = None, cfg: TrainConfig | None = None):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_hf_config("qwen2_moe"))
    seqs = torch.randint(0, 97, (32, 16), generator=torch.Generator().manual_seed(1))
    cfg = cfg or TrainConfig(steps=steps, batch_size=4, lr=1e-2, schedule="cosine", warmup_ratio=0.2, eval_every=2,
                             checkpoint_every=4)
    context = TrainContext(run_dir, stage="submodel", seed=0, metrics=MetricsWriter(run_dir.parent / "m.jsonl"),
                           progress=False, save_second_moment=True, stop_at=stop_at)
    result = train(model, seqs, seqs[:4], cfg, context)
    return model, result


def test_stop_at_checkpoints_mid_schedule_and_a_resume_continues_it_exactly(tmp_path):
    """A synchronisation round's contract: stopping at any step and resuming equals one uninterrupted run."""
    straight, _ = _train_tiny(tmp_path / "straight", steps=10)
    _, first = _train_tiny(tmp_path / "split", steps=10, stop_at=7)  # 7: not a checkpoint_every multiple
    assert first.steps == 7 and not (tmp_path / "split" / "model.safetensors").exists()
    ckpt = checkpoint_dir(tmp_path / "split", 7)
    assert (ckpt / "model.safetensors").is_file() and (ckpt / SECOND_MOMENT_FILE).is_file()
    resumed, second = _train_tiny(tmp_path / "split", steps=10)
    assert second.resumed_from == 7 and second.steps == 10
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, msg=name)


def test_a_resume_after_stop_at_starts_from_the_edited_checkpoint(tmp_path):
    _train_tiny(tmp_path / "run", steps=6, stop_at=3)
    ckpt = checkpoint_dir(tmp_path / "run", 3) / "model.safetensors"
    state = load_file(ckpt)
    state["model.norm.weight"] = torch.full_like(state["model.norm.weight"], 7.0)
    save_file(state, ckpt)
    model, result = _train_tiny(tmp_path / "run", steps=6, stop_at=4)
    assert result.resumed_from == 3 and result.steps == 4
    assert (model.state_dict()["model.norm.weight"] - 7.0).abs().max() < 0.1  # one step of lr 1e-2 from 7


def test_stop_at_outside_the_run_is_refused(tmp_path):
    with pytest.raises(ValueError, match="stop_at 11 is outside 1..10"):
        _train_tiny(tmp_path / "run", steps=10, stop_at=11)


def test_a_wsd_checkpoint_annealed_is_the_run_that_stopped_there(tmp_path):
    """`decayed_from` resumed from a long wsd run's stable-phase checkpoint trains exactly the shorter run."""
    cfg = TrainConfig(steps=20, batch_size=4, lr=1e-2, schedule="wsd", warmup_ratio=0.1, eval_every=2,
                      checkpoint_every=4)
    _train_tiny(tmp_path / "long", 20, stop_at=8, cfg=cfg)
    branch = decayed_from(cfg, 8)
    (tmp_path / "branch" / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint_dir(tmp_path / "long", 8), checkpoint_dir(tmp_path / "branch", 8))
    annealed, result = _train_tiny(tmp_path / "branch", branch.steps, cfg=branch)
    short, _ = _train_tiny(tmp_path / "short", branch.steps, cfg=branch)
    assert result.resumed_from == 8 and result.steps == 10
    for name, tensor in short.state_dict().items():
        torch.testing.assert_close(annealed.state_dict()[name], tensor, msg=name)
