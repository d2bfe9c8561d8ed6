"""Reintegration: E trained submodels become one MoE (paper sec. 3.1.3, eq. 2).

    merge_submodels(OUTPUT / "source", [OUTPUT / "submodels/0/model.safetensors", ...], weights=[0.3, 0.2, ...],
                    router_init="concat", out=OUTPUT / "merged")
    AutoModelForCausalLM.from_pretrained(OUTPUT / "merged")   # a standard Hugging Face folder

Experts are concatenated along the expert axis; shared parameters are the weighted mean of the submodels' copies
(WP-SGD weights gamma_k = n_k / sum n, or uniform 1/E), or, with `fisher`, the element-wise Fisher-weighted mean:
an element a submodel's loss was not sensitive to (an embedding row of a token its cluster lacks) does not dilute
the copies that learned something. Router rows come from the submodels (`concat`, the paper's choice), from a
fresh initialisation (`random`), or from each cluster's mean hidden state (`centroid`, applied afterwards by
`init_router_from_centroids`). The merge reads one tensor of one submodel at a time and writes shards as it goes,
so its peak memory is about one shard plus the largest tensor (plus a few more with `fisher`), not E submodels.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moedisco.layout import write_atomically
from moedisco.split import WEIGHTS_FILE, Role, num_experts_of, parameter_roles, read_config

INDEX_FILE = "model.safetensors.index.json"
FISHER_FLOOR = 1e-30


def averaging_weights(cluster_sizes: Sequence[int], weighting: str) -> list[float]:
    """gamma_k of eq. 2: sample-count weights (WP-SGD) or uniform."""
    if any(size <= 0 for size in cluster_sizes):
        raise ValueError(f"every cluster needs documents, got sizes {list(cluster_sizes)}")
    if weighting == "uniform":
        return [1.0 / len(cluster_sizes)] * len(cluster_sizes)
    total = float(sum(cluster_sizes))
    return [size / total for size in cluster_sizes]


class ShardWriter:
    """Collects tensors and flushes a safetensors shard whenever `max_shard_bytes` is reached."""

    def __init__(self, out: Path, max_shard_bytes: int):
        self.out, self.max_shard_bytes = out, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.pending and self.pending_bytes + tensor.nbytes > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += tensor.nbytes
        self.total_bytes += tensor.nbytes

    def _flush(self) -> None:
        save_file(self.pending, self.out / f"shard-{len(self.shards):05d}.tmp", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Name the shards as `save_pretrained` does and write the index when there is more than one."""
        if self.pending or not self.shards:
            self._flush()
        if len(self.shards) == 1:
            (self.out / "shard-00000.tmp").rename(self.out / WEIGHTS_FILE)
            return
        weight_map = {}
        for index, names in enumerate(self.shards):
            final = f"model-{index + 1:05d}-of-{len(self.shards):05d}.safetensors"
            (self.out / f"shard-{index:05d}.tmp").rename(self.out / final)
            weight_map.update({name: final for name in names})
        index_payload = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        write_atomically(self.out / INDEX_FILE, json.dumps(index_payload, indent=2))


def _weighted_sum(name: str, handles: list, weights: Sequence[float]) -> torch.Tensor:
    """sum_k weights[k] * tensor_k, accumulated in fp32 one submodel at a time: only the running sum and one copy
    are ever in memory."""
    total = None
    for handle, weight in zip(handles, weights):
        tensor = handle.get_tensor(name)
        total = tensor.float() * weight if total is None else total.add_(tensor.float(), alpha=weight)
    return total.to(tensor.dtype)


def _fisher_sum(name: str, handles: list, fisher_handles: list, weights: Sequence[float]) -> torch.Tensor:
    """sum_k gamma_k F_k theta_k / sum_k gamma_k F_k element-wise (Fisher-weighted averaging, Matena & Raffel 2022).

    FISHER_FLOOR is far below any squared gradient a trained element sees, so it only matters where no submodel's
    loss was sensitive (e.g. the embedding row of a token no cluster contains): there the result is the plain
    gamma-weighted mean.
    """
    numerator = denominator = None
    for handle, fisher_handle, gamma in zip(handles, fisher_handles, weights):
        tensor = handle.get_tensor(name)
        f_gamma = fisher_handle.get_tensor(name).float().add_(FISHER_FLOOR).mul_(gamma)
        if numerator is None:
            numerator, denominator = tensor.float() * f_gamma, f_gamma
        else:
            numerator.addcmul_(tensor.float(), f_gamma)
            denominator.add_(f_gamma)
    return numerator.div_(denominator).to(tensor.dtype)


def _shared_average(name: str, handles: list, weights: Sequence[float], fisher_handles: list | None) -> torch.Tensor:
    if fisher_handles is not None:
        return _fisher_sum(name, handles, fisher_handles, weights)
    return _weighted_sum(name, handles, weights)


def _open_all(stack: ExitStack, submodels: Sequence[Path], weights: Sequence[float],
              fisher: Sequence[Path] | None) -> tuple[list, Callable[[str], list | None]]:
    """Open every submodel file (and Fisher file); returns the handles and, per tensor name, the Fisher handles to
    weight it with (None: plain weights)."""
    if len(submodels) != len(weights):
        raise ValueError(f"{len(submodels)} submodels but {len(weights)} weights")
    if fisher is not None and len(fisher) != len(submodels):
        raise ValueError(f"{len(submodels)} submodels but {len(fisher)} Fisher files")
    handles = [stack.enter_context(safe_open(path, framework="pt")) for path in submodels]
    fisher_handles = None if fisher is None else [stack.enter_context(safe_open(path, framework="pt"))
                                                  for path in fisher]
    # Parameters frozen while branching have no second moment; their copies are all equal anyway.
    with_fisher = set(fisher_handles[0].keys()) if fisher_handles else set()
    return handles, lambda name: fisher_handles if name in with_fisher else None


def average_shared(roles: dict[str, Role], submodels: Sequence[Path], weights: Sequence[float],
                   fisher: Sequence[Path] | None = None) -> dict[str, torch.Tensor]:
    """The merge's average of every shared tensor the submodel files hold, as one state dict (the backbone)."""
    with ExitStack() as stack:
        handles, fisher_for = _open_all(stack, submodels, weights, fisher)
        stored = set(handles[0].keys())
        return {name: _shared_average(name, handles, weights, fisher_for(name))
                for name, role in roles.items() if role == "shared" and name in stored}


def _merged_tensor(name: str, role: Role, handles: list, weights: Sequence[float], router_init: str,
                   init_std: float, generator: torch.Generator, fisher_handles: list | None) -> torch.Tensor:
    if role == "shared":
        return _shared_average(name, handles, weights, fisher_handles)
    if role == "router" and router_init == "random":
        shape = (len(handles), *handles[0].get_slice(name).get_shape()[1:])
        return torch.randn(shape, generator=generator) * init_std
    return torch.cat([handle.get_tensor(name) for handle in handles], dim=0)


def merge_submodels(source: Path, submodels: Sequence[Path], weights: Sequence[float], router_init: str,
                    out: Path, seed: int = 0, max_shard_bytes: int = 1 << 30,
                    fisher: Sequence[Path] | None = None) -> Path:
    """Write the merged MoE to `out` (config.json + safetensors) and return `out`.

    `fisher`, when given, holds each submodel's diagonal Fisher estimate (`train.second_moments`): shared
    parameters are then Fisher-weighted averages, each element scaled by gamma_k F_k.
    """
    config = read_config(source)
    roles = parameter_roles(config)
    generator = torch.Generator().manual_seed(seed)
    with ExitStack() as stack:
        handles, fisher_for = _open_all(stack, submodels, weights, fisher)
        out.mkdir(parents=True, exist_ok=True)
        writer = ShardWriter(out, max_shard_bytes)
        stored = set(handles[0].keys())
        for name, role in roles.items():
            if name in stored:  # a tied lm_head is stored once, as the embedding
                writer.add(name, _merged_tensor(name, role, handles, list(weights), router_init,
                                                config.initializer_range, generator, fisher_for(name)))
    writer.close()
    config.save_pretrained(out)
    return out


def router_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The gate of every MoE layer: modules named `*.mlp.gate` holding an [E, H] weight."""
    num_experts = num_experts_of(model.config)
    return {name: module for name, module in model.named_modules()
            if name.endswith("mlp.gate") and getattr(module, "weight", None) is not None
            and module.weight.shape[0] == num_experts}


@torch.no_grad()
def cluster_mean_hidden(model, cluster_seqs: Sequence[torch.Tensor], batch_size: int = 8) -> dict[str, torch.Tensor]:
    """For every router: [E, H] mean of the hidden states entering it, row k over cluster k's tokens."""
    gates = router_modules(model)
    current: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_hook(lambda mod, args, out, name=name: current.__setitem__(
        name, args[0].reshape(-1, args[0].shape[-1]).float().mean(0))) for name, module in gates.items()]
    try:
        rows: dict[str, list[torch.Tensor]] = {name: [] for name in gates}
        model.eval()
        for seqs_NL in cluster_seqs:
            sums = {name: torch.zeros(model.config.hidden_size) for name in gates}
            num_batches = 0
            for start in range(0, len(seqs_NL), batch_size):
                model(input_ids=seqs_NL[start : start + batch_size])
                num_batches += 1
                for name in gates:
                    sums[name] += current[name].cpu()
            for name in gates:
                rows[name].append(sums[name] / num_batches)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.stack(r) for name, r in rows.items()}


def init_router_from_centroids(model, cluster_seqs: Sequence[torch.Tensor]) -> None:
    """Router row k := unit-normalised mean hidden state of cluster k, so tokens start at their cluster's expert."""
    means = cluster_mean_hidden(model, cluster_seqs)
    for name, module in router_modules(model).items():
        rows_EH = torch.nn.functional.normalize(means[name], dim=-1)
        module.weight.data.copy_(rows_EH.to(module.weight.dtype))
