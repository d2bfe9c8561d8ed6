"""Checkpoints of a training run: weights, optimizer, RNG and loop state in `run_dir/checkpoints/step_N`.

    save_checkpoint(run_dir, model, optimizer, {"step": 50, ...}, spec_yaml, keep=2)
    state = load_checkpoint(checkpoint_dirs(run_dir)[-1], model, optimizer)   # the newest complete one

A checkpoint is written into a `.partial` folder, its files synced to storage, and renamed into place once its
`trainer_state.json` is written, so one that looks complete is complete, also after the node that wrote it is gone.
The weights and the optimizer state are serialised at once, on threads of their own. Sharded
(`moedisco.training.fsdp`), every rank writes its part of the optimizer state into the same folder and rank 0 the
gathered weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moedisco.io.atomic import partial_of, put_in_place
from moedisco.models.weights import unique_state_dict
from moedisco.training import fsdp
from moedisco.training.optimizer import second_moments

SECOND_MOMENT_FILE = "second_moment.safetensors"



CHECKPOINT_NAME = re.compile(r"step_(\d+)")



def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The complete checkpoints in `run_dir`, oldest first: folders named exactly `step_N` (not a `.partial` one
    being written or restored, even when it already holds its files) with their `trainer_state.json`."""
    folder = run_dir / "checkpoints"
    steps = {}
    for child in folder.iterdir() if folder.is_dir() else ():
        match = CHECKPOINT_NAME.fullmatch(child.name)
        if match and (child / "trainer_state.json").is_file():
            steps[int(match.group(1))] = child
    return [steps[step] for step in sorted(steps)]



def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"



def save_checkpoint(run_dir: Path, model, optimizer, state: dict, spec_yaml: str | None, keep: int,
                    moments: bool = False, rank: int = 0) -> Path:
    """Weights, optimizer, RNG and loop state in `run_dir/checkpoints/step_N`; `moments` adds the second moments
    (`second_moments`), which a synchronisation round averages with.

    Unsharded, rank 0 alone calls it. Sharded (`moedisco.training.fsdp`), every rank does: rank 0 writes the gathered
    weights and moments, each rank its part of the optimizer state.
    """
    final = checkpoint_dir(run_dir, state["step"])
    partial = partial_of(final, shared=True)  # every rank of a sharded save writes into it
    sharded = fsdp.is_sharded(model)
    weights = fsdp.full_state_dict(model) if sharded else unique_state_dict(model)
    second = second_moments(model, optimizer) if moments else None

    def write_files() -> None:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        writes = [lambda: save_file(weights, partial / "model.safetensors", metadata={"format": "pt"}),
                  lambda: torch.save({"cpu": torch.get_rng_state(), "cuda": _cuda_rng()}, partial / "rng.pt")]
        if not sharded:
            writes.append(lambda: torch.save(optimizer.state_dict(), partial / "optimizer.pt"))
        if second is not None:
            writes.append(lambda: save_file(second, partial / SECOND_MOMENT_FILE, metadata={"format": "pt"}))
        if spec_yaml is not None:
            writes.append(lambda: (partial / "spec.yaml").write_text(spec_yaml))
        _run_at_once(writes)

    def finish() -> None:
        # trainer_state.json is written last, every file synced and the folder renamed into place, so neither a crash
        # mid-save nor the loss of the node's page cache leaves a checkpoint that looks complete and is not.
        (partial / "trainer_state.json").write_text(json.dumps(state))
        _run_at_once([lambda file=file: sync_file(file) for file in partial.rglob("*")])
        put_in_place(partial, final)
        sync_file(final.parent)
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    fsdp.on_rank_zero(model, rank, write_files)  # on every rank when sharded: the folder exists after it
    if sharded:
        fsdp.save_optimizer(partial, model, optimizer)  # returns once all have written
    fsdp.on_rank_zero(model, rank, finish)
    return final



def _run_at_once(writes: list) -> None:
    """Run the writes on threads (safetensors and torch.save serialise with the GIL released); raise the first error."""
    with ThreadPoolExecutor(max_workers=len(writes)) as pool:
        for future in [pool.submit(write) for write in writes]:
            future.result()



def sync_file(path: Path) -> None:
    """Flush a file, or a folder's entries, to storage. A folder some filesystems cannot sync (NFS, FUSE mounts
    refuse with EINVAL) is left to them: they write its entries through."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError) if path.is_dir() else contextlib.nullcontext():
            os.fsync(descriptor)
    finally:
        os.close(descriptor)



def checkpoint_bytes(ckpt: Path) -> int:
    """Bytes of a checkpoint's files, a sharded save's optimizer parts included."""
    return sum(file.stat().st_size for file in ckpt.rglob("*") if file.is_file())



def _cuda_rng():
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None



def load_checkpoint(ckpt: Path, model, optimizer) -> dict:
    """Weights, optimizer, RNG and loop state of an unsharded model (`load_weights` + `load_training_state`)."""
    load_weights(ckpt, model)
    return load_training_state(ckpt, model, optimizer)



def load_weights(ckpt: Path, model) -> None:
    """The checkpoint's weights, into an unsharded model (a sharded run loads them before sharding)."""
    model.load_state_dict(load_file(ckpt / "model.safetensors"), strict=False)



def load_training_state(ckpt: Path, model, optimizer) -> dict:
    """The optimizer (sharded or not, as saved), RNG and loop state; returns the loop state."""
    if fsdp.is_sharded(model):
        fsdp.load_optimizer(ckpt, model, optimizer)
    else:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))
    rng = torch.load(ckpt / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((ckpt / "trainer_state.json").read_text())

