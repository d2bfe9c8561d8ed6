"""The routers of a loaded MoE, found through its architecture's registry entry, and tokens routed by hand.

    router_modules(model)                     # {"model.layers.0.mlp.gate": <router>, ...}
    with force_experts(model, range(4, 8)):   # every token routed among experts 4-7 by their own router rows:
        logits = model(input_ids).logits      # what the submodel holding experts 4-7 computes
    with force_experts(model, [2]):           # every token to expert 2 alone: oracle routing for cluster 2
        ...

Forcing works for every architecture's router the same way: a copy of the router restricted to the chosen experts
(its rows of every per-expert tensor, `moedisco.models.architecture.expert_axes`) routes the tokens, so the weights
are the ones that architecture gives (softmax or sigmoid, normalised or scaled), as in the submodel.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch
from transformers import PretrainedConfig

from moedisco.models.architecture import entry_of, expert_axes, num_experts_of, take_experts, with_num_experts


def router_modules(model: torch.nn.Module, config: PretrainedConfig | None = None) -> dict[str, torch.nn.Module]:
    """Every MoE layer's router (the module its registry entry names, e.g. `mlp.gate`), by module name. `model` may
    be one decoder layer when `config` is given."""
    config = config or model.config
    suffix = entry_of(config).router
    return {name: module for name, module in model.named_modules()
            if (name == suffix or name.endswith("." + suffix)) and hasattr(module, "top_k")}


_AXES: dict[str, dict[str, tuple[int, ...]]] = {}


def router_axes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """The expert axes of each tensor of a router module, by its name inside the router (`weight`, `bias`, ...).
    Kept per config: `expert_axes` builds two models on the meta device, and forced routing asks once per layer,
    group and batch of an evaluation."""
    key = config.to_json_string(use_diff=False)
    if key not in _AXES:
        if len(_AXES) >= 16:
            _AXES.clear()
        suffix = "." + entry_of(config).router + "."
        axes: dict[str, tuple[int, ...]] = {}
        for name, tensor_axes in expert_axes(config).items():
            if suffix in name and tensor_axes:
                axes.setdefault(name.split(suffix, 1)[1], tensor_axes)
        _AXES[key] = axes
    return _AXES[key]


def restricted_router(router: torch.nn.Module, axes: dict[str, tuple[int, ...]], first: int, count: int,
                      config: PretrainedConfig) -> torch.nn.Module:
    """A copy of `router` over experts [first, first + count) only, routing as the submodel of those experts does
    (`config`: the MoE's, resized to `count` experts by `with_num_experts`)."""
    sub = copy.deepcopy(router)
    for name, tensor in list(sub.state_dict(keep_vars=True).items()):
        if name in axes:
            owner, _, leaf = name.rpartition(".")
            module = sub.get_submodule(owner) if owner else sub
            narrowed = take_experts(tensor.detach(), axes[name], first, count).clone()
            if isinstance(tensor, torch.nn.Parameter):
                module._parameters[leaf] = torch.nn.Parameter(narrowed, requires_grad=False)
            else:
                module._buffers[leaf] = narrowed
    sub.num_experts, sub.top_k = count, config.num_experts_per_tok
    if hasattr(sub, "num_group"):  # DeepSeek-style group-limited routing, as the submodel's config has it
        sub.num_group, sub.topk_group = config.n_group, config.topk_group
    return sub


def _contiguous(experts: Iterable[int]) -> tuple[int, int]:
    chosen = sorted(experts)
    if not chosen or chosen != list(range(chosen[0], chosen[0] + len(chosen))):
        raise ValueError(f"experts {chosen}: forced routing takes one consecutive group of experts")
    return chosen[0], len(chosen)


@contextmanager
def force_experts(model: torch.nn.Module, experts: Sequence[int], config: PretrainedConfig | None = None):
    """Route every token of every MoE layer among `experts` (one consecutive group) by their own router rows; one
    expert: every token to it alone. `model` may be one decoder layer when `config` is given."""
    config = config or model.config
    first, count = _contiguous(experts)
    if first + count > num_experts_of(config):
        raise ValueError(f"experts {first}-{first + count - 1}: the model has {num_experts_of(config)}")
    axes, submodel = router_axes(config), with_num_experts(config, count)

    def rerouted(sub: torch.nn.Module, args: tuple, output: tuple) -> tuple:
        _, weights, indices = sub(*args)
        return output[0], weights, indices + first

    handles = [router.register_forward_hook(
        lambda module, args, output, sub=restricted_router(router, axes, first, count, submodel):
        rerouted(sub, args, output))
        for router in router_modules(model, config).values()]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
