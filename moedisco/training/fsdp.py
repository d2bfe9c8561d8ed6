"""FSDP2 sharding of one training run over the processes of a torch.distributed group (no Ray here).

    dist.init_process_group("gloo")            # or Ray Train's TorchTrainer, which sets the group up
    hooks = TrainHooks(wrap_model=shard_model, rank=dist.get_rank(), world_size=dist.get_world_size())
    train(model, train_NL, eval_NL, cfg, TrainContext(..., hooks=hooks))

`shard_model` applies `fully_shard` to every decoder layer, the embedding, the final norm and the output head (units
of their own, because evaluation calls the decoder and the head separately), then to the root. A sharded run's
optimizer state is saved and restored sharded with torch.distributed.checkpoint, each rank its own part; its weights
and second moments are gathered to rank 0 and written as the same `model.safetensors` an unsharded run writes, so the
synchronisation rounds and the merge work on both alike. Every function here is collective when the model is
sharded: all ranks call it, in the same order.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, init_device_mesh

OPTIMIZER_DIR = "optimizer_sharded"  # torch.distributed.checkpoint's folder in a sharded run's checkpoint
LOCAL_OPTIMIZER_FILE = "optimizer_rank{rank}.pt"  # or each rank's own optimizer state (`save_optimizer`)


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """Shard `model` (a Hugging Face causal LM, already on this rank's device) in place over the default group."""
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    decoder = model.get_decoder()
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embedding.weight
    # A tied head shares its weight with the embedding, so both must be one unit.
    fully_shard([embedding, head] if tied else embedding, mesh=mesh)
    fully_shard(decoder.norm, mesh=mesh)
    if head is not None and not tied:
        fully_shard(head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _first_forward(model, device)
    return model


@torch.no_grad()
def _first_forward(model: torch.nn.Module, device: torch.device) -> None:
    """FSDP2 sets its units up on the root's first forward and refuses a first forward through a unit (evaluation
    starts at the decoder), so the root runs once on one token here."""
    was_training = model.training
    model.eval()
    model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
    model.train(was_training)


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (collective), or the tensor itself when it is not sharded."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on rank 0's CPU ({} on the other ranks), tied duplicates left out as
    `split.unique_state_dict` does."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    unique = {name for name, _ in model.named_parameters()}
    duplicates = {name for name, _ in model.named_parameters(remove_duplicate=False)} - unique
    return {name: tensor.contiguous() for name, tensor in state.items() if name not in duplicates}


def save_optimizer(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Each rank writes its part of the optimizer state into the `checkpoint` folder: torch.distributed.checkpoint
    in OPTIMIZER_DIR, or, for an optimizer whose state is per rank (`state_is_local`: `optimizer.StoredAdamW`'s
    quantised codes, which DCP would take for replicated tensors), one `optimizer_rank<r>.pt` per rank."""
    if getattr(optimizer, "state_is_local", False):
        saved = {"world_size": dist.get_world_size(), "state": optimizer.state_dict()}
        torch.save(saved, checkpoint / LOCAL_OPTIMIZER_FILE.format(rank=dist.get_rank()))
        dist.barrier()
        return
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(checkpoint / OPTIMIZER_DIR))


def load_optimizer(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Each rank reads its part of the optimizer state saved by `save_optimizer`: DCP's re-shards to any world
    size; a per-rank state needs the world size it was saved with."""
    if not getattr(optimizer, "state_is_local", False):
        state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=str(checkpoint / OPTIMIZER_DIR))
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        return
    path = checkpoint / LOCAL_OPTIMIZER_FILE.format(rank=dist.get_rank())
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this checkpoint holds no per-rank optimizer state for rank "
                                f"{dist.get_rank()} (was it saved by another optimizer or fewer ranks?)")
    saved = torch.load(path, weights_only=False)
    if saved["world_size"] != dist.get_world_size():
        raise ValueError(f"{checkpoint} holds an optimizer state sharded over {saved['world_size']} ranks; it resumes "
                         f"only on as many, not {dist.get_world_size()} (its 8-bit/bf16 state is per rank)")
    optimizer.load_state_dict(saved["state"])


def barrier(model: torch.nn.Module) -> None:
    """Wait for every rank of a sharded run (a no-op otherwise): rank 0's files are written before anyone reads."""
    if is_sharded(model):
        dist.barrier()


def on_rank_zero(model: torch.nn.Module, rank: int, action: Callable[[], None]) -> None:
    """Run `action` (rank 0's writes: metrics, checkpoint files, the claim check before them) on rank 0, and raise
    what it raised on every rank of a sharded run, each of which calls this at the same point: a rank that went on
    alone would wait forever in the next collective for a rank 0 that left (e.g. on `layout.ClaimLost`)."""
    error = None
    if rank == 0:
        try:
            action()
        except Exception as raised:  # shared below, then raised again on every rank
            error = raised
    if is_sharded(model):
        shared = [_portable(error)]
        dist.broadcast_object_list(shared, src=0)
        if rank != 0 and isinstance(shared[0], tuple):
            error = RuntimeError("rank 0 failed with {}: {}".format(*shared[0]))
        elif rank != 0:
            error = shared[0]
    if error is not None:
        raise error


def _portable(error: Exception | None) -> Exception | tuple[str, str] | None:
    """`error` itself when it survives pickling (the other ranks raise the same type, e.g. `layout.ClaimLost`),
    else its type's name and message: an exception whose constructor takes other arguments than its `args` fails
    to unpickle, which would leave the other ranks with that failure instead of rank 0's."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return type(error).__qualname__, str(error)


def mean_over_ranks(value: float, model: torch.nn.Module) -> float:
    """A rank's training loss averaged over the ranks of a sharded run: the loss of the whole batch."""
    if not is_sharded(model):
        return value
    total = torch.tensor([value], dtype=torch.float64, device=next(model.parameters()).device)
    dist.all_reduce(total)
    return float(total) / dist.get_world_size()
