"""The memory measures of `TrainConfig` (moedisco.training.memory): each gives the same training as plain fp32, or as close
as its number format allows, and resumes exactly; the peak-memory meter sees an allocation."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moedisco.config.spec import TrainConfig
from moedisco.job.metrics import MetricsWriter
from moedisco.training.checkpoint import SECOND_MOMENT_FILE
from moedisco.training.loop import TrainContext, TrainHooks, _Loop, train
from moedisco.training.memory import PeakMemory, prepare_model
from moedisco.training.optimizer import StoredAdamW, make_optimizer, second_moment
from tests.conftest import REPO, tiny_hf_config

CPU = torch.device("cpu")
SEQS_NL = torch.randint(0, 97, (32, 16), generator=torch.Generator().manual_seed(1))


def _tiny_model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_hf_config("qwen2_moe"))


def _first_step(tmp_path, **measures) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of step 0 as the training loop computes them (read by an optimizer pre-step hook)."""
    cfg = TrainConfig(steps=1, batch_size=8, grad_clip=0.0, precision="fp32", **measures)
    model = prepare_model(_tiny_model(), cfg, CPU)
    optimizer = make_optimizer(model, cfg)
    grads = {}
    optimizer.register_step_pre_hook(lambda *_: grads.update(
        {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}))
    ctx = TrainContext(tmp_path, stage="submodel", seed=0, metrics=MetricsWriter(tmp_path / "m.jsonl"),
                       progress=False, hooks=TrainHooks())
    loop = _Loop(model, model, optimizer, SEQS_NL, None, cfg, ctx, CPU, {"step": 0, "seconds": 0.0})
    return loop._step(0), grads


@pytest.mark.parametrize("measures", [{"micro_batch_size": 2}, {"activation_checkpointing": True}])
def test_micro_batches_and_checkpointing_give_the_full_batch_loss_and_gradients(tmp_path, measures):
    plain_loss, plain = _first_step(tmp_path)
    loss, grads = _first_step(tmp_path, **measures)
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    assert set(grads) == set(plain)
    for name, grad in plain.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_true_keeps_updates_below_bf16_resolution():
    """At lr 1e-4 every AdamW update of a weight near 1 is below half a bf16 spacing (2^-9): rounded to nearest,
    the weight never moves; with the compensation buffer, weight + buffer follow fp32 and the weight itself stays
    within half a spacing of it."""
    def run(dtype, optimizer_class):
        weight = torch.nn.Parameter(torch.ones(64, 64, dtype=dtype))
        optimizer = optimizer_class([weight], lr=1e-4, betas=(0.9, 0.95))
        for _ in range(50):
            weight.grad = torch.ones_like(weight)
            optimizer.step()
        compensation = optimizer.state[weight].get("compensation", torch.zeros(()))
        return weight.detach().float(), weight.detach().float() + compensation.float()

    fp32, _ = run(torch.float32, torch.optim.AdamW)
    assert torch.equal(run(torch.bfloat16, torch.optim.AdamW)[0], torch.ones(64, 64))  # every update lost
    weight, master = run(torch.bfloat16, StoredAdamW)
    moved = 1.0 - fp32  # ~5e-3: ~1.3 bf16 spacings; weight + buffer hold ~16 bits, so a few % of it
    assert ((master - fp32).abs() <= 0.03 * moved).all()
    assert (weight - fp32).abs().max() <= 2**-9


MEASURES = [{"optimizer": "adamw-8bit"},  # bitsandbytes' AdamW8bit over fp32 weights
            # StoredAdamW with every measure that keeps state (micro-batches and checkpointing keep none)
            {"precision": "bf16-true", "optimizer": "adamw-8bit", "offload_optimizer": True}]


def _train_tiny(run_dir, stop_at: int | None = None, **measures):
    model = _tiny_model()
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-2, eval_every=2, checkpoint_every=2, **measures)
    context = TrainContext(run_dir, stage="submodel", seed=0, metrics=MetricsWriter(run_dir.parent / "m.jsonl"),
                           progress=False, save_second_moment=True, stop_at=stop_at)
    return model, train(model, SEQS_NL, None, cfg, context)


@pytest.mark.parametrize("measures", MEASURES, ids=["bnb-8bit", "bf16-true-8bit-offload"])
def test_the_measures_resume_exactly_and_save_the_fisher_moments(tmp_path, measures):
    straight, _ = _train_tiny(tmp_path / "straight", **measures)
    _, first = _train_tiny(tmp_path / "split", stop_at=1, **measures)
    resumed, second = _train_tiny(tmp_path / "split", **measures)
    assert first.steps == 1 and second.resumed_from == 1
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    moments = load_file(tmp_path / "split" / SECOND_MOMENT_FILE)
    assert set(moments) == {name for name, _ in straight.named_parameters()}
    assert all(torch.isfinite(m).all() and (m >= 0).all() and m.any() for m in moments.values())


@pytest.mark.parametrize("measures", [{"optimizer": "adamw-8bit"}, {"precision": "bf16-true"},
                                      {"precision": "bf16-true", "optimizer": "adamw-8bit"}],
                         ids=["bnb-8bit", "bf16-states", "8bit-states"])
def test_the_fisher_merge_reads_the_dequantised_second_moment(measures):
    """After one step AdamW's second moment is (1 - beta2) g^2: what `second_moment` reads from each optimizer's
    stored state matches it within the error of the state's number format."""
    cfg = TrainConfig(**measures)
    model = prepare_model(_tiny_model(), cfg, CPU)
    optimizer = make_optimizer(model, cfg)
    expected = {}
    optimizer.register_step_pre_hook(lambda *_: expected.update(
        {p: (1 - cfg.betas[1]) * p.grad.float() ** 2 for p in model.parameters()}))
    model(input_ids=SEQS_NL[:4], labels=SEQS_NL[:4]).loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        moment, step = second_moment(optimizer, param)
        assert step == 1.0
        error = (moment - expected[param]).norm() / expected[param].norm()
        assert error < (0.05 if cfg.optimizer == "adamw-8bit" else 0.01), (name, float(error))


def test_the_cpu_meter_sees_an_allocation_made_after_it_started():
    meter = PeakMemory(CPU)
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del block
    assert 0.06 <= meter.peak_gb() < 0.5


# After a 16 MB block is freed, glibc would put the next ones in its heap, where a small block kept above them
# pins their pages: a CPU stage's freed activations would stay resident (`memory.return_freed_tensors_to_the_os`).
FRAGMENTING = """
from pathlib import Path
import torch
from moedisco.config.spec import TrainConfig
from moedisco.training.memory import prepare_model
from tests.conftest import REPO, tiny_hf_config
from transformers import AutoModelForCausalLM
prepare_model(AutoModelForCausalLM.from_config(tiny_hf_config("qwen2_moe")), TrainConfig(), torch.device("cpu"))
rss = lambda: int(next(l.split()[1] for l in Path("/proc/self/status").read_text().splitlines()
                       if l.startswith("VmRSS:"))) / 1024
torch.ones(4 << 20).sum()
start, big, small = rss(), [], []
for _ in range(8):
    big.append(torch.ones(4 << 20))
    small.append(torch.ones(50_000))
del big
print(rss() - start)
"""


def test_a_cpu_stage_gives_freed_tensors_back_to_the_os():
    out = subprocess.run([sys.executable, "-c", FRAGMENTING], capture_output=True, text=True, check=True, cwd=REPO)
    assert float(out.stdout.split()[-1]) < 32  # MB still resident of the 128 MB freed (glibc's default: ~130)


def test_measure_fields_are_validated_and_old_specs_keep_their_meaning():
    assert TrainConfig(dtype="bf16").precision == "bf16-mixed"  # specs saved before `precision` existed
    assert TrainConfig(dtype="fp32").precision == "fp32"
    with pytest.raises(ValueError, match=r"micro_batch_size \(3\) must divide batch_size \(16\)"):
        TrainConfig(batch_size=16, micro_batch_size=3)
