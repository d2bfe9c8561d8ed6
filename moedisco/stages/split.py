"""Model decoupling: a Hugging Face MoE becomes E dense submodels (paper sec. 3.1.1).

    source = build_source_moe(spec, vocab_size=4096, eos_id=0, pad_id=1)   # or from spec.model.pretrained
    sub = load_submodel(OUTPUT / "source", expert=2)    # shared parameters + expert 2 of every MoE layer
    summary = stage_source(run)                          # the stage: the source MoE in OUTPUT/source

A submodel is the same architecture with one expert per MoE layer and top-1 routing: the router's softmax over one
expert is identically 1, so every token goes through the expert (plus the shared expert where the architecture has
one) and the gate gets no gradient. Keeping the class unchanged makes the submodel an ordinary Hugging Face model,
and splitting and merging tensor slices (`moedisco.models.architecture.parameter_roles` says which).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from moedisco.config.spec import ARCHITECTURES, JobSpec, ModelConfig
from moedisco.models.architecture import (
    Role,
    build_moe_config,
    num_experts_of,
    parameter_roles,
    read_config,
    with_num_experts,
)
from moedisco.models.upcycle import DENSE_TO_MOE, upcycle_dense
from moedisco.models.weights import WEIGHTS_FILE, save_weights
from moedisco.stages import prepare
from moedisco.stages.stage_run import StageRun


def build_source_moe(spec: JobSpec, vocab_size: int, eos_id: int, pad_id: int) -> PreTrainedModel:
    """The MoE every run starts from: a local pretrained checkpoint, or a seeded fresh initialisation."""
    if spec.model.pretrained is not None:
        return load_pretrained_moe(spec.model.pretrained, spec.model)
    torch.manual_seed(spec.seed)
    return AutoModelForCausalLM.from_config(build_moe_config(spec.model, vocab_size, eos_id, pad_id))


def load_pretrained_moe(path: Path, cfg: ModelConfig) -> PreTrainedModel:
    """A local MoE checkpoint as it is, or a dense one upcycled into an MoE (see `moedisco.models.upcycle`)."""
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


def stage_source(run: StageRun) -> dict:
    tokenizer = prepare.load_tokenizer(run.paths.tokenizer)
    model = build_source_moe(run.spec, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    save_weights(model, run.paths.source)
    return {"arch": model.config.model_type, "parameters": sum(p.numel() for p in model.parameters())}
