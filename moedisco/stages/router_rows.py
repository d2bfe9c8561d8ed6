"""Router rows of a merged MoE from its clusters' mean hidden states (`merge.router_init: centroid`), patched into
its saved files.

    rows = centroid_router_rows(OUTPUT / "merged", cluster_seqs)   # {"model.layers.0.mlp.gate.weight": [K, H], ...}
    patch_tensors(OUTPUT / "merged", grouped_rows(rows, OUTPUT / "merged"))   # groups: centroid + trained offsets
    init_router_from_centroids(model, cluster_seqs)                 # the same on a loaded model

Row k is the unit-normalised mean hidden state entering the router over cluster k's tokens, so tokens start at
their cluster's expert. The rows are computed one decoder layer at a time (`moedisco.models.layerwise`), and only
the router's bytes are rewritten: the whole MoE is never in memory.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from moedisco.models.architecture import num_experts_of
from moedisco.models.layerwise import stream_layers
from moedisco.models.routing import router_modules
from moedisco.models.weights import SavedWeights, files_of


def _linear_routers(layer: torch.nn.Module, config) -> dict[str, torch.nn.Module]:
    """The routers whose scores are one linear map of the hidden state ([E, H] `weight`): what centroid rows set."""
    routers = router_modules(layer, config)
    experts = num_experts_of(config)
    linear = {name: module for name, module in routers.items()
              if getattr(module, "weight", None) is not None and module.weight.shape[0] == experts}
    if routers and not linear:
        raise ValueError(f"merge.router_init 'centroid' sets the rows of a linear router; {config.model_type}'s "
                         "router is not one: use 'concat'")
    return linear


def _input_sum_hooks(gates: dict[str, torch.nn.Module], sums: dict[str, list]) -> list:
    """Hooks adding, per gate, the sum over the tokens of the hidden states entering it and their count to
    `sums[name]` ([sum_H, count]; a batch that goes through in several passes adds up)."""

    def add(name: str, hidden: torch.Tensor) -> None:
        hidden_TH = hidden.reshape(-1, hidden.shape[-1]).float()
        sums[name][0] += hidden_TH.sum(0).cpu()
        sums[name][1] += len(hidden_TH)

    return [module.register_forward_hook(lambda mod, args, out, name=name: add(name, args[0]))
            for name, module in gates.items()]


def _batch_sums(names, hidden_size: int) -> dict[str, list]:
    return {name: [torch.zeros(hidden_size), 0] for name in names}


def centroid_router_rows(folder: Path, cluster_seqs: Sequence[torch.Tensor],
                         batch_size: int = 8) -> dict[str, torch.Tensor]:
    """`init_router_from_centroids`'s rows for the model saved in `folder`, keyed by router tensor name, computed
    one decoder layer at a time (`moedisco.models.layerwise`): the whole MoE is never in memory.

    The hidden state entering layer l's router depends on the routing of the layers below, which mixes every
    expert, so a submodel (the backbone and one expert) would give other rows. Layer by layer the rows are the
    full model's, with one layer's weights and the sampled sequences' hidden states in memory.
    """
    num_batches = [math.ceil(len(seqs_NL) / batch_size) for seqs_NL in cluster_seqs]
    sums: dict[str, list[torch.Tensor]] = {}
    with SavedWeights(folder) as weights:

        def on_layer(index: int, layer: torch.nn.Module):
            gates = {f"model.layers.{index}.{name}": module
                     for name, module in _linear_routers(layer, weights.config).items()}
            current = _batch_sums(gates, weights.config.hidden_size)
            _input_sum_hooks(gates, current)  # the layer goes back to the meta device, hooks and all, after use
            sums.update({name: [torch.zeros(weights.config.hidden_size) for _ in cluster_seqs] for name in gates})

            @contextmanager
            def batch(group: int):
                current.update(_batch_sums(gates, weights.config.hidden_size))
                yield
                for name, (total_H, count) in current.items():
                    sums[name][group] += total_H / count

            return batch

        stream_layers(weights, cluster_seqs, batch_size, on_layer)
    return {f"{name}.weight": _unit_rows(torch.stack([total / count for total, count in zip(rows, num_batches)]))
            for name, rows in sums.items()}


def grouped_rows(centroids: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    """Router rows of a model whose submodels each trained a group of g experts from one row per cluster
    (`centroid_router_rows`, K rows): expert e of group k gets cluster k's row plus its trained row's offset from its
    group's mean. The centroid sends tokens to the right group; within it, the submodel's own router still picks."""
    with SavedWeights(folder) as weights:
        trained = {name: weights.get(name).float() for name in centroids}
    rows = {}
    for name, rows_KH in centroids.items():
        trained_KGH = trained[name].reshape(len(rows_KH), -1, rows_KH.shape[-1])
        rows[name] = (rows_KH[:, None] + trained_KGH - trained_KGH.mean(1, keepdim=True)).flatten(0, 1)
    return rows


def _unit_rows(means_EH: torch.Tensor) -> torch.Tensor:
    """Router row k := unit-normalised mean hidden state of cluster k, so tokens start at their cluster's expert."""
    return torch.nn.functional.normalize(means_EH, dim=-1)


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def patch_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Overwrite `tensors` in place in the safetensors files of `folder`, cast to each stored tensor's dtype.

    A tensor of unchanged shape and dtype occupies the same bytes, so only those bytes are written: no shard is
    read or rewritten whole. (safetensors has no update API; the format is an 8-byte little-endian header length,
    a JSON header of `data_offsets`, then the raw little-endian data.)
    """
    files = files_of(folder)
    for name, tensor in tensors.items():
        with files[name].open("r+b") as handle:
            header_len = struct.unpack("<Q", handle.read(8))[0]
            entry = json.loads(handle.read(header_len))[name]
            stored = tensor.to(SAFETENSORS_DTYPES[entry["dtype"]]).contiguous()
            begin, end = entry["data_offsets"]
            if list(stored.shape) != entry["shape"] or stored.nbytes != end - begin:
                raise ValueError(f"{name}: new shape {tuple(stored.shape)} is not the stored {entry['shape']}")
            handle.seek(8 + header_len + begin)
            handle.write(stored.view(torch.uint8).numpy().tobytes())


@torch.no_grad()
def cluster_mean_hidden(model, cluster_seqs: Sequence[torch.Tensor], batch_size: int = 8) -> dict[str, torch.Tensor]:
    """For every router: [E, H] mean of the hidden states entering it, row k over cluster k's tokens."""
    gates = _linear_routers(model, model.config)
    current = _batch_sums(gates, model.config.hidden_size)
    hooks = _input_sum_hooks(gates, current)
    try:
        rows: dict[str, list[torch.Tensor]] = {name: [] for name in gates}
        model.eval()
        for seqs_NL in cluster_seqs:
            sums = {name: torch.zeros(model.config.hidden_size) for name in gates}
            num_batches = 0
            for start in range(0, len(seqs_NL), batch_size):
                current.update(_batch_sums(gates, model.config.hidden_size))
                model(input_ids=seqs_NL[start : start + batch_size])
                num_batches += 1
                for name, (total_H, count) in current.items():
                    sums[name] += total_H / count
            for name in gates:
                rows[name].append(sums[name] / num_batches)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.stack(r) for name, r in rows.items()}


def init_router_from_centroids(model, cluster_seqs: Sequence[torch.Tensor]) -> None:
    """Router row k := unit-normalised mean hidden state of cluster k (`_unit_rows`) on a loaded model."""
    means = cluster_mean_hidden(model, cluster_seqs)
    for name, module in _linear_routers(model, model.config).items():
        rows_EH = _unit_rows(means[name])
        module.weight.data.copy_(rows_EH.to(module.weight.dtype))
