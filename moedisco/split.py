"""Model decoupling: a Hugging Face MoE becomes E dense submodels (paper sec. 3.1.1).

    source = build_source_moe(spec, vocab_size=4096, special_ids=(0, 1))   # or from spec.model.pretrained
    save_weights(source, OUTPUT / "source")
    sub = load_submodel(OUTPUT / "source", expert=2)    # shared parameters + expert 2 of every MoE layer

A submodel is the same architecture with one expert per MoE layer and top-1 routing. With a single expert the
router's softmax is identically 1, so the gate is removed in effect: it gets no gradient, and every token goes
through the expert (plus the shared expert where the architecture has one). Keeping the class unchanged means the
submodel is an ordinary Hugging Face model and merging is a matter of tensor slices.

Which tensors are shared, per-expert or router is read off the model itself: a tensor whose leading dimension is E in
the full model and 1 in the one-expert model belongs to an expert (under `.experts.`) or to the router (elsewhere).
That works for fused expert storage (transformers 5.x: `experts.gate_up_proj` of shape [E, 2I, H]) and needs no
per-architecture name tables.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from moedisco.config import ARCHITECTURES, JobSpec, ModelConfig
from moedisco.dense_to_moe import DENSE_TO_MOE, upcycle_dense

Role = Literal["shared", "expert", "router"]
WEIGHTS_FILE = "model.safetensors"


def expert_count_key(config: PretrainedConfig) -> str:
    return "num_local_experts" if config.model_type == "mixtral" else "num_experts"


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
    """Role of every tensor of the full MoE's state dict, from comparing it with the one-expert model."""
    num_experts = num_experts_of(config)
    full, single = _meta_shapes(config), _meta_shapes(with_num_experts(config, 1))
    if set(full) != set(single):
        raise ValueError(f"{config.model_type}: expert tensors are not fused; unsupported layout")
    roles: dict[str, Role] = {}
    for name, shape in full.items():
        if shape == single[name]:
            roles[name] = "shared"
        elif shape[0] == num_experts and single[name][0] == 1 and shape[1:] == single[name][1:]:
            roles[name] = "expert" if ".experts." in name else "router"
        else:
            raise ValueError(f"{name}: shape {tuple(shape)} is neither shared nor per-expert")
    return roles


def build_source_moe(spec: JobSpec, vocab_size: int, eos_id: int, pad_id: int) -> PreTrainedModel:
    """The MoE every run starts from: a local pretrained checkpoint, or a seeded fresh initialisation."""
    if spec.model.pretrained is not None:
        return load_pretrained_moe(spec.model.pretrained, spec.model)
    torch.manual_seed(spec.seed)
    return AutoModelForCausalLM.from_config(build_moe_config(spec.model, vocab_size, eos_id, pad_id))


def load_pretrained_moe(path: Path, cfg: ModelConfig) -> PreTrainedModel:
    """A local MoE checkpoint as it is, or a dense one upcycled into an MoE (see `moedisco.dense_to_moe`)."""
    if not (path / "config.json").is_file():
        raise ValueError(f"model.pretrained {path}: no config.json (expected a Hugging Face model folder)")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if config.model_type in DENSE_TO_MOE:
        return upcycle_dense(path, cfg)
    if config.model_type not in ARCHITECTURES:
        raise ValueError(f"model.pretrained {path}: model_type {config.model_type!r} is neither an MoE "
                         f"{ARCHITECTURES} nor a dense model to upcycle {tuple(DENSE_TO_MOE)}")
    if num_experts_of(config) != cfg.num_experts:
        raise ValueError(
            f"model.num_experts is {cfg.num_experts} but the checkpoint at {path} has {num_experts_of(config)} experts"
        )
    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied duplicates dropped (safetensors refuses shared storage) and tensors made contiguous."""
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().contiguous().cpu()
    return state


def save_weights(model: PreTrainedModel, folder: Path) -> None:
    """config.json + model.safetensors with the model's own (runtime) tensor names; loads with from_pretrained."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    save_file(unique_state_dict(model), folder / WEIGHTS_FILE, metadata={"format": "pt"})


def expert_slice(tensor: torch.Tensor, role: Role, expert: int) -> torch.Tensor:
    return tensor if role == "shared" else tensor[expert : expert + 1]


def submodel_state(get_tensor: Callable[[str], torch.Tensor], roles: dict[str, Role], expert: int) -> dict:
    """Shared tensors plus row `expert` of every per-expert tensor; `get_tensor(name)` reads one tensor."""
    return {name: expert_slice(get_tensor(name), role, expert).clone() for name, role in roles.items()}


def load_submodel(source: Path, expert: int) -> PreTrainedModel:
    """Submodel `expert` of the MoE saved in `source`, read one tensor at a time (the whole MoE is never loaded)."""
    config = read_config(source)
    if not 0 <= expert < num_experts_of(config):
        raise ValueError(f"expert {expert} out of range for {num_experts_of(config)} experts")
    model = AutoModelForCausalLM.from_config(with_num_experts(config, 1))
    roles = parameter_roles(config)
    with safe_open(source / WEIGHTS_FILE, framework="pt") as weights:
        # A tied lm_head is stored once (as the embedding); tie_weights() restores it.
        present = {name: role for name, role in roles.items() if name in set(weights.keys())}
        model.load_state_dict(submodel_state(weights.get_tensor, present, expert), strict=False)
    model.tie_weights()
    return model


def read_config(folder: Path) -> PretrainedConfig:
    return AutoConfig.from_pretrained(str(folder), local_files_only=True)

