"""FSDP2 sharding (`moedisco.sharding`): two gloo ranks on the CPU train as one process does, and their sharded
checkpoints resume and feed the synchronisation rounds and the merge (the weights and second moments files)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moedisco.config import TrainConfig
from moedisco.metrics import MetricsWriter
from moedisco.sharding import OPTIMIZER_DIR
from moedisco.train import SECOND_MOMENT_FILE, TrainContext, TrainHooks, checkpoint_dir, train
from tests.conftest import tiny_hf_config

CFG = TrainConfig(steps=4, batch_size=4, lr=3e-3, eval_every=1, eval_batches=1, checkpoint_every=100,
                  device="cpu", schedule="cosine", warmup_ratio=0.25)
ROUND_END = 2
ROUND_COPY = "round_checkpoint"


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_hf_config("qwen2_moe"))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 97, (16, 12), generator=generator), torch.randint(0, 97, (4, 12), generator=generator)


def _run(run_dir: Path, hooks: TrainHooks) -> None:
    """A run in two calls, as a synchronisation round makes it: to ROUND_END with a checkpoint (a copy is kept in
    ROUND_COPY: the finished run removes its checkpoints), then resumed from it by a fresh model."""
    train_NL, eval_NL = _data()
    for stop_at in (ROUND_END, None):
        ctx = TrainContext(run_dir=run_dir, stage="submodel", seed=3, metrics=MetricsWriter(run_dir / "metrics.jsonl"),
                           hooks=hooks, progress=False, save_second_moment=True, stop_at=stop_at)
        train(_model(), train_NL, eval_NL, CFG, ctx)
        if stop_at is not None and hooks.rank == 0:
            shutil.copytree(checkpoint_dir(run_dir, ROUND_END), run_dir / ROUND_COPY)


def _sharded_worker(rank: int, world_size: int, run_dir: Path, init_file: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        from moedisco.sharding import shard_model

        _run(run_dir, TrainHooks(wrap_model=shard_model, rank=rank, world_size=world_size))
    finally:
        dist.destroy_process_group()


def _losses(run_dir: Path) -> list[tuple[float | None, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["loss"], r["eval_loss"]) for r in map(json.loads, lines)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("sharding")
    single, sharded = folder / "single", folder / "sharded"
    _run(single, TrainHooks())
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Forked, the ranks start with torch and transformers already imported.
    mp.start_processes(_sharded_worker, args=(2, sharded, folder / "init"), nprocs=2, start_method="fork")
    return single, sharded


def test_two_sharded_ranks_train_as_one_process(runs):
    single, sharded = runs
    expected, got = _losses(single), _losses(sharded)
    assert len(got) == len(expected) == CFG.steps + 1  # the untrained model, then every step
    for (loss, eval_loss), (want_loss, want_eval) in zip(got, expected):
        assert eval_loss == pytest.approx(want_eval, rel=1e-4)
        assert (loss is None and want_loss is None) or loss == pytest.approx(want_loss, rel=1e-4)
    final, want = load_file(sharded / "model.safetensors"), load_file(single / "model.safetensors")
    assert final.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-4, atol=1e-5)


def test_sharded_checkpoint_holds_what_sync_and_merge_read(runs):
    single, sharded = runs
    # The round's checkpoint: the optimizer in torch.distributed.checkpoint's format, the weights and moments whole.
    checkpoint = sharded / ROUND_COPY
    assert (checkpoint / OPTIMIZER_DIR / ".metadata").is_file() and not (checkpoint / "optimizer.pt").exists()
    for name in ("model.safetensors", SECOND_MOMENT_FILE):
        got, want = load_file(checkpoint / name), load_file(single / ROUND_COPY / name)
        assert got.keys() == want.keys(), name
        for key, tensor in want.items():
            torch.testing.assert_close(got[key].float(), tensor.float(), rtol=2e-2, atol=1e-7)
    moments, want = load_file(sharded / SECOND_MOMENT_FILE), load_file(single / SECOND_MOMENT_FILE)
    assert moments.keys() == want.keys()
