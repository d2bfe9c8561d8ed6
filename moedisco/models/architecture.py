"""The MoE architectures moedisco handles, as transformers builds them: configs, tensor roles, weights on disk.

    config = build_moe_config(spec.model, vocab_size=4096, eos_id=0, pad_id=1)
    roles = parameter_roles(config)        # {"model.layers.0.mlp.experts.gate_up_proj": "expert", ...}
    save_weights(model, OUTPUT / "source"); read_config(OUTPUT / "source")

Which tensors are shared, per-expert or router is read off the model itself: a tensor with a dimension that is E in
the full model and 1 in the one-expert model belongs to an expert (under `.experts.`) or to the router (elsewhere).
That works for fused expert storage (transformers 5.x: `experts.gate_up_proj` of shape [E, 2I, H]) and needs no
per-architecture name tables; what cannot be read off (the expert count's config key, the router's name) is the
architecture's entry in `moedisco.config.architectures`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from moedisco.config.architectures import ArchitectureEntry, architecture
from moedisco.config.spec import ModelConfig
from moedisco.models import llama_moe  # noqa: F401 - registers `llama_moe` with transformers' Auto classes

Role = Literal["shared", "expert", "router"]


def entry_of(config: PretrainedConfig) -> ArchitectureEntry:
    """The architecture's registry entry (`moedisco.config.architectures`); a ValueError for an unknown one."""
    return architecture(config.model_type)


def expert_count_key(config: PretrainedConfig) -> str:
    return entry_of(config).count_key


def num_experts_of(config: PretrainedConfig) -> int:
    return int(getattr(config, expert_count_key(config)))


def with_num_experts(config: PretrainedConfig, num_experts: int) -> PretrainedConfig:
    """A copy of `config` with `num_experts` experts per MoE layer, top-k capped at that, and whatever else the
    architecture sizes by its expert count (its registry entry's `resize`)."""
    config = copy.deepcopy(config)
    entry = entry_of(config)
    entry.resize(config, num_experts)  # before the count changes: it may size by the old one
    setattr(config, entry.count_key, num_experts)
    config.num_experts_per_tok = min(config.num_experts_per_tok, num_experts)
    return config


def build_moe_config(cfg: ModelConfig, vocab_size: int, eos_id: int, pad_id: int) -> PretrainedConfig:
    """A from-scratch MoE config of the spec's architecture and sizes."""
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings, num_experts_per_tok=cfg.num_experts_per_tok,
        router_aux_loss_coef=cfg.router_aux_loss_coef, tie_word_embeddings=False,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id,
    )
    kwargs.update(architecture(cfg.arch).config_keys(cfg))
    kwargs.update(cfg.overrides)
    return AutoConfig.for_model(cfg.arch, **kwargs)


def _meta_shapes(config: PretrainedConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def expert_axes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """The axes along which each tensor of the MoE's state dict holds one slice per expert: () for a shared tensor,
    (0,) for stacked experts and router rows, (0, 1) for a router layer mixing experts (LLaMA-MoE's gate network).
    Found by comparing the model's shapes with those of the model of another expert count (one expert; two for a
    one-expert model, such as an extension's source): the axes that change are the expert axes."""
    num_experts = num_experts_of(config)
    count = 1 if num_experts > 1 else 2
    full, other = _meta_shapes(config), _meta_shapes(with_num_experts(config, count))
    if set(full) != set(other):
        raise ValueError(f"{config.model_type}: tensor names depend on the expert count (experts not stored fused, "
                         "[E, ...]); unsupported layout")
    axes: dict[str, tuple[int, ...]] = {}
    for name, shape in full.items():
        changed = tuple(i for i, (a, b) in enumerate(zip(shape, other[name])) if a != b)
        if len(shape) != len(other[name]) or any(shape[i] != num_experts or other[name][i] != count
                                                 for i in changed):
            raise ValueError(f"{name}: shape {tuple(shape)} is neither shared nor per-expert")
        axes[name] = changed
    return axes


def mixing_tensors(config: PretrainedConfig) -> list[str]:
    """Tensors with several expert axes (a router layer where every expert's score reads every other's, as
    LLaMA-MoE's gate network): experts cannot be added or removed one at a time where there are any."""
    return [name for name, axes in expert_axes(config).items() if len(axes) > 1]


def parameter_roles(config: PretrainedConfig) -> dict[str, Role]:
    """Role of every tensor of the MoE's state dict: per-expert tensors (`expert_axes`) are the experts' under
    `.experts.` and the router's elsewhere."""
    return {name: "shared" if not axes else "expert" if ".experts." in name else "router"
            for name, axes in expert_axes(config).items()}


def take_experts(tensor: torch.Tensor, axes: tuple[int, ...], first: int, count: int) -> torch.Tensor:
    """Experts [first, first + count) of a per-expert tensor, along each of its expert axes."""
    for axis in axes:
        tensor = tensor.narrow(axis, first, count)
    return tensor


def join_experts(parts: list[torch.Tensor], axes: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of `take_experts` over consecutive groups: concatenated along the expert axis. A tensor with two
    expert axes (a router layer mixing experts) gets each part as its diagonal block and keeps `base`'s values
    between groups, which no submodel trained."""
    if len(axes) == 1:
        return torch.cat(parts, dim=axes[0])
    if base is None:
        raise ValueError("joining a tensor with several expert axes needs the tensor it was split from")
    joined, first = base.clone(), 0
    for part in parts:
        take_experts(joined, axes, first, part.shape[axes[0]]).copy_(part)
        first += part.shape[axes[0]]
    return joined


def read_config(folder: Path) -> PretrainedConfig:
    return AutoConfig.from_pretrained(str(folder), local_files_only=True)
