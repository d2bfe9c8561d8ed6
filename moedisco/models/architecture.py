"""The MoE architectures moedisco handles, as transformers builds them: configs, tensor roles, weights on disk.

    config = build_moe_config(spec.model, vocab_size=4096, eos_id=0, pad_id=1)
    roles = parameter_roles(config)        # {"model.layers.0.mlp.experts.gate_up_proj": "expert", ...}
    save_weights(model, OUTPUT / "source"); read_config(OUTPUT / "source")

Which tensors are shared, per-expert or router is read off the model itself: a tensor whose leading dimension is E in
the full model and 1 in the one-expert model belongs to an expert (under `.experts.`) or to the router (elsewhere).
That works for fused expert storage (transformers 5.x: `experts.gate_up_proj` of shape [E, 2I, H]) and needs no
per-architecture name tables.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from moedisco.config.spec import ModelConfig
from moedisco.job.provenance import expert_count_key as count_key_of

Role = Literal["shared", "expert", "router"]



def expert_count_key(config: PretrainedConfig) -> str:
    return count_key_of(config.model_type)



def num_experts_of(config: PretrainedConfig) -> int:
    return int(getattr(config, expert_count_key(config)))



def with_num_experts(config: PretrainedConfig, num_experts: int) -> PretrainedConfig:
    """A copy of `config` with `num_experts` experts per MoE layer and top-k capped at that."""
    config = copy.deepcopy(config)
    setattr(config, expert_count_key(config), num_experts)
    config.num_experts_per_tok = min(config.num_experts_per_tok, num_experts)
    return config



def _arch_kwargs(cfg: ModelConfig) -> dict:
    if cfg.arch == "qwen2_moe":
        return dict(num_experts=cfg.num_experts, intermediate_size=cfg.intermediate_size,
                    moe_intermediate_size=cfg.moe_intermediate_size,
                    shared_expert_intermediate_size=cfg.shared_expert_intermediate_size, decoder_sparse_step=1)
    if cfg.arch == "mixtral":
        return dict(num_local_experts=cfg.num_experts, intermediate_size=cfg.intermediate_size)
    if cfg.arch == "olmoe":
        # OLMoE's `intermediate_size` is the expert width; it has no dense FFN layers.
        return dict(num_experts=cfg.num_experts, intermediate_size=cfg.moe_intermediate_size)
    return dict(num_experts=cfg.num_experts, intermediate_size=cfg.intermediate_size,
                moe_intermediate_size=cfg.moe_intermediate_size, decoder_sparse_step=1,
                head_dim=cfg.hidden_size // cfg.num_attention_heads)



def build_moe_config(cfg: ModelConfig, vocab_size: int, eos_id: int, pad_id: int) -> PretrainedConfig:
    """A from-scratch MoE config of the spec's architecture and sizes."""
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings, num_experts_per_tok=cfg.num_experts_per_tok,
        router_aux_loss_coef=cfg.router_aux_loss_coef, tie_word_embeddings=False,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id,
    )
    kwargs.update(_arch_kwargs(cfg))
    kwargs.update(cfg.overrides)
    return AutoConfig.for_model(cfg.arch, **kwargs)



def _meta_shapes(config: PretrainedConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}



def parameter_roles(config: PretrainedConfig) -> dict[str, Role]:
    """Role of every tensor of the MoE's state dict, from comparing it with the model of another expert count (one
    expert; two for a one-expert model, such as an extension's source)."""
    num_experts = num_experts_of(config)
    count = 1 if num_experts > 1 else 2
    full, other = _meta_shapes(config), _meta_shapes(with_num_experts(config, count))
    if set(full) != set(other):
        raise ValueError(f"{config.model_type}: expert tensors are not fused; unsupported layout")
    roles: dict[str, Role] = {}
    for name, shape in full.items():
        if shape == other[name]:
            roles[name] = "shared"
        elif shape[0] == num_experts and other[name][0] == count and shape[1:] == other[name][1:]:
            roles[name] = "expert" if ".experts." in name else "router"
        else:
            raise ValueError(f"{name}: shape {tuple(shape)} is neither shared nor per-expert")
    return roles



def read_config(folder: Path) -> PretrainedConfig:
    return AutoConfig.from_pretrained(str(folder), local_files_only=True)
