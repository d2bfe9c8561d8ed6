"""FSDP2 sharding (`moedisco.training.fsdp`): two gloo ranks on the CPU train as one process does, and their sharded
checkpoints resume and feed the synchronisation rounds and the merge (the weights and second moments files)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moedisco.config.spec import TrainConfig
from moedisco.job.metrics import MetricsWriter
from moedisco.training.checkpoint import SECOND_MOMENT_FILE, checkpoint_dir
from moedisco.training.fsdp import LOCAL_OPTIMIZER_FILE, OPTIMIZER_DIR
from moedisco.training.loop import TrainContext, TrainHooks, train
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


# Every memory measure the planner may pick for a big model at once (`moedisco.planning.memory_plan.plan_measures`).
MEASURED = CFG.model_copy(update={"precision": "bf16-true", "optimizer": "adamw-8bit", "offload_optimizer": True,
                                  "activation_checkpointing": True, "micro_batch_size": 1})


def _run(run_dir: Path, hooks: TrainHooks, cfg: TrainConfig | None = None, stops=(ROUND_END, None)) -> None:
    """A run in two calls, as a synchronisation round makes it: to ROUND_END with a checkpoint (a copy is kept in
    ROUND_COPY: the finished run removes its checkpoints), then resumed from it by a fresh model."""
    train_NL, eval_NL = _data()
    for stop_at in stops:
        ctx = TrainContext(run_dir=run_dir, stage="submodel", seed=3, metrics=MetricsWriter(run_dir / "metrics.jsonl"),
                           hooks=hooks, progress=False, save_second_moment=True, stop_at=stop_at)
        train(_model(), train_NL, eval_NL, cfg or CFG, ctx)
        if stop_at is not None and hooks.rank == 0:
            shutil.copytree(checkpoint_dir(run_dir, ROUND_END), run_dir / ROUND_COPY)


def _sharded_worker(rank: int, world_size: int, run_dir: Path, init_file: Path, cfg: TrainConfig | None = None,
                    straight_dir: Path | None = None) -> None:
    """`_run` on this rank; with `straight_dir`, also the same run without the stop, in one call."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        from moedisco.training.fsdp import shard_model

        hooks = TrainHooks(wrap_model=shard_model, rank=rank, world_size=world_size)
        _run(run_dir, hooks, cfg)
        if straight_dir is not None:
            _run(straight_dir, hooks, cfg, stops=(None,))
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


@pytest.fixture(scope="module")
def measured_runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """With every memory measure on: a single-process run, a sharded one resumed at ROUND_END, and a sharded one
    straight through."""
    folder = tmp_path_factory.mktemp("sharding_measured")
    single, sharded, straight = folder / "single", folder / "sharded", folder / "straight"
    _run(single, TrainHooks(), MEASURED)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_sharded_worker, args=(2, sharded, folder / "init", MEASURED, straight), nprocs=2,
                       start_method="fork")
    return single, sharded, straight


def _assert_files_close(got_file: Path, want_file: Path, atol: Callable[[torch.Tensor], float]) -> None:
    """Every tensor of `got_file` within `atol(expected tensor)` of `want_file`'s, element by element."""
    got, want = load_file(got_file), load_file(want_file)
    assert got.keys() == want.keys(), got_file
    for key, tensor in want.items():
        torch.testing.assert_close(got[key].float(), tensor.float(), rtol=0.0, atol=atol(tensor.float()),
                                   msg=lambda message, key=key: f"{got_file}: {key}: {message}")


def test_sharded_run_with_every_memory_measure_trains_as_one_process_and_resumes_exactly(measured_runs):
    single, sharded, straight = measured_runs
    # Not bitwise: bf16 weights round each update to 8 mantissa bits, the two ranks' bf16 gradients are summed in
    # another order than one process's, and each shard's 8-bit moments are quantised in blocks of that shard (a
    # small tensor's halves are two blocks, not one), so the losses agree to bf16 precision, not fp32's. A weight
    # whose gradient is rounding noise (a key bias: softmax ignores it) gets Adam's full-size step of either sign,
    # so the weights agree to within two steps of the learning rate, not relatively.
    for (loss, eval_loss), (want_loss, want_eval) in zip(_losses(sharded), _losses(single), strict=True):
        assert eval_loss == pytest.approx(want_eval, rel=1e-3)
        assert (loss is None and want_loss is None) or loss == pytest.approx(want_loss, rel=1e-3)
    _assert_files_close(sharded / "model.safetensors", single / "model.safetensors", lambda _: 2 * CFG.lr)
    # The Fisher second moments, gathered from the ranks' 8-bit shards: within a fifth of each tensor's largest
    # moment (both runs' moments are 8-bit, in different blocks, of gradients that differ as the weights do); a
    # shard gathered to the wrong place would be off by the moments' whole spread.
    for name in (SECOND_MOMENT_FILE, f"{ROUND_COPY}/{SECOND_MOMENT_FILE}"):
        _assert_files_close(sharded / name, single / name, lambda want: 0.2 * float(want.abs().max()))
    # The quantised state is saved rank by rank, and the resumed run continues exactly as the uninterrupted one.
    checkpoint = sharded / ROUND_COPY
    assert all((checkpoint / LOCAL_OPTIMIZER_FILE.format(rank=rank)).is_file() for rank in range(2))
    assert not (checkpoint / OPTIMIZER_DIR).exists()
    assert _losses(sharded) == _losses(straight)
    resumed, uninterrupted = load_file(sharded / "model.safetensors"), load_file(straight / "model.safetensors")
    assert all(torch.equal(tensor, uninterrupted[name]) for name, tensor in resumed.items())


def _resume_worker(rank: int, checkpoint: Path, init_file: Path) -> None:
    """One rank loads the optimizer state a two-rank run saved rank by rank."""
    from moedisco.training import fsdp
    from moedisco.training.memory import prepare_model
    from moedisco.training.optimizer import make_optimizer

    torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP pool (it would hang)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=1)
    try:
        model = fsdp.shard_model(prepare_model(_model(), MEASURED, torch.device("cpu")))
        fsdp.load_optimizer(checkpoint, model, make_optimizer(model, MEASURED))
    finally:
        dist.destroy_process_group()


def test_per_rank_optimizer_state_refuses_another_world_size(measured_runs, tmp_path):
    _, sharded, _ = measured_runs
    with pytest.raises(mp.ProcessRaisedException, match="sharded over 2 ranks; it resumes only on as many, not 1"):
        mp.start_processes(_resume_worker, args=(sharded / ROUND_COPY, tmp_path / "init"), nprocs=1,
                           start_method="fork")


def _lease_lost_worker(rank: int, run_dir: Path, init_file: Path, outcome: Path) -> None:
    """A sharded run whose rank 0 alone learns, at its third write, that another runner took the job folder."""
    from moedisco.job.layout import ClaimLost
    from moedisco.training.fsdp import shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    writes = []

    def before_write() -> None:
        writes.append(None)
        if len(writes) == 3:
            raise ClaimLost("another runner owns the job folder now")

    try:
        _run(run_dir, TrainHooks(wrap_model=shard_model, rank=rank, world_size=2, before_write=before_write),
             stops=(None,))
    except ClaimLost as stopped:
        (outcome / f"rank{rank}").write_text(str(stopped))
    finally:
        dist.destroy_process_group()


def test_an_error_on_rank_zero_alone_stops_every_rank(tmp_path):
    (tmp_path / "outcome").mkdir()
    context = mp.start_processes(_lease_lost_worker, args=(tmp_path / "run", tmp_path / "init", tmp_path / "outcome"),
                                 nprocs=2, start_method="fork", join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("a rank still waits in a collective after rank 0 stopped")
    assert sorted(path.name for path in (tmp_path / "outcome").iterdir()) == ["rank0", "rank1"]


class _TwoArgumentError(Exception):
    def __init__(self, stage: str, gb: float):
        super().__init__(f"{stage} is {gb} GB short")  # `args` is the message alone: unpickling calls __init__(msg)


def test_rank_zero_shares_its_error_whole_when_it_pickles_else_by_name_and_message():
    from moedisco.job.layout import ClaimLost
    from moedisco.training.fsdp import _portable

    assert _portable(None) is None
    owner = ClaimLost("another runner owns the job folder now")
    assert _portable(owner) is owner
    with pytest.raises(TypeError):
        pickle.loads(pickle.dumps(_TwoArgumentError("submodel", 1.5)))
    assert _portable(_TwoArgumentError("submodel", 1.5)) == ("_TwoArgumentError", "submodel is 1.5 GB short")
