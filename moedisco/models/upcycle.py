"""Branching the MoE from the shared warm-up: the one-expert model becomes every expert (sparse upcycling).

    upcycle_submodel(OUTPUT / "source", OUTPUT / "runs/warmup/model.safetensors", OUTPUT / "branched")

The warm-up's shared parameters carry over and its one expert is copied into every expert; the router keeps the
source's initialisation. Upcycling a dense Hugging Face checkpoint (`model.pretrained`) is `moedisco.models.upcycle`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from moedisco.config.spec import ModelConfig
from moedisco.models.architecture import num_experts_of, parameter_roles, read_config
from moedisco.models.weights import WEIGHTS_FILE


def upcycle_submodel(source: Path, dense_weights: Path, out: Path) -> Path:
    """A full MoE whose shared parameters and every expert come from a trained one-expert model.

    Router rows keep the source's initialisation: the one-expert model's single row carries no routing information.
    """
    config = read_config(source)
    num_experts = num_experts_of(config)
    state = {}
    with safe_open(dense_weights, framework="pt") as dense, safe_open(source / WEIGHTS_FILE, framework="pt") as src:
        stored = set(src.keys())
        for name, role in parameter_roles(config).items():
            if name not in stored:
                continue  # tied lm_head
            if role == "router":
                state[name] = src.get_tensor(name)
            else:
                tensor = dense.get_tensor(name)
                state[name] = tensor.expand(num_experts, *tensor.shape[1:]).clone() if role == "expert" else tensor
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file(state, out / WEIGHTS_FILE, metadata={"format": "pt"})
    return out


DENSE_TO_MOE = {"qwen2": "qwen2_moe", "mistral": "mixtral", "llama": "mixtral", "qwen3": "qwen3_moe"}



_DROP = {"model_type", "architectures", "transformers_version", "intermediate_size", "_name_or_path", "dtype",
         "torch_dtype", "mlp_bias", "attention_bias", "use_sliding_window", "layer_types", "max_window_layers"}



def moe_config_from_dense(dense: PretrainedConfig, cfg: ModelConfig) -> PretrainedConfig:
    if getattr(dense, "mlp_bias", False):
        raise ValueError(f"model.pretrained: {dense.model_type} with mlp_bias cannot be upcycled (experts have no bias)")
    if dense.model_type == "llama" and getattr(dense, "attention_bias", False):
        raise ValueError("model.pretrained: llama with attention_bias cannot become a Mixtral (no attention bias)")
    moe_type = DENSE_TO_MOE[dense.model_type]
    width = dense.intermediate_size
    common = {k: v for k, v in dense.to_dict().items() if k not in _DROP}
    common.update(num_experts_per_tok=cfg.num_experts_per_tok, router_aux_loss_coef=cfg.router_aux_loss_coef)
    if moe_type == "mixtral":
        extra = dict(num_local_experts=cfg.num_experts, intermediate_size=width)
    else:
        extra = dict(num_experts=cfg.num_experts, intermediate_size=width, moe_intermediate_size=width,
                     decoder_sparse_step=1, norm_topk_prob=True, mlp_only_layers=[])
        if moe_type == "qwen2_moe":
            extra["shared_expert_intermediate_size"] = width
    return AutoConfig.for_model(moe_type, **{**common, **extra})



def _dense_tensor_for(name: str, dense: dict[str, torch.Tensor], num_experts: int) -> torch.Tensor | None:
    """The dense tensor(s) an MoE tensor starts from, or None for tensors that keep their initialisation."""
    if name in dense:
        return dense[name]
    prefix, _, leaf = name.rpartition(".mlp.")
    mlp = f"{prefix}.mlp."
    if leaf == "experts.gate_up_proj":  # [E, 2I, H]: gate rows first, then up rows
        fused = torch.cat([dense[mlp + "gate_proj.weight"], dense[mlp + "up_proj.weight"]], dim=0)
        return fused.unsqueeze(0).expand(num_experts, *fused.shape).clone()
    if leaf == "experts.down_proj":
        down = dense[mlp + "down_proj.weight"]
        return down.unsqueeze(0).expand(num_experts, *down.shape).clone()
    if leaf.startswith("shared_expert.") and not leaf.startswith("shared_expert_gate"):
        return dense[mlp + leaf.removeprefix("shared_expert.")]
    return None



def upcycle_dense(path: Path, cfg: ModelConfig) -> PreTrainedModel:
    """A local dense checkpoint (qwen2, mistral, llama, qwen3) as an MoE with `cfg.num_experts` copies of its FFN."""
    dense_model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    dense = dense_model.state_dict()
    config = moe_config_from_dense(dense_model.config, cfg)
    moe = AutoModelForCausalLM.from_config(config)
    state = moe.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            source = _dense_tensor_for(name, dense, cfg.num_experts)
            if source is not None:
                if source.shape != tensor.shape:
                    raise ValueError(f"upcycling {path}: {name} is {tuple(source.shape)}, expected {tuple(tensor.shape)}")
                tensor.copy_(source)
    return moe
