"""Model decoupling: a Hugging Face MoE becomes E dense submodels (paper sec. 3.1.1).

    source = build_source_moe(spec, vocab_size=4096, eos_id=0, pad_id=1)   # or from spec.model.pretrained
    sub = load_submodel(OUTPUT / "source", 2)           # shared parameters + expert 2 of every MoE layer
    sub = load_submodel(OUTPUT / "source", 2, group=8)  # shared parameters + experts 16-23 and their router rows
    summary = stage_source(run)                          # the stage: the source MoE in OUTPUT/source

A submodel is the same architecture with one expert per MoE layer and top-1 routing: the router's softmax over one
expert is identically 1, so every token goes through the expert (plus the shared expert where the architecture has
one) and the gate gets no gradient. With `model.experts_per_submodel` = g > 1 (fine-grained MoEs), submodel k holds
experts [k*g, (k+1)*g) and their router rows, and routes top-k among them. Keeping the class unchanged makes the
submodel an ordinary Hugging Face model, and splitting and merging tensor slices
(`moedisco.models.architecture.expert_axes` says which).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from moedisco.config.architectures import ARCHITECTURES
from moedisco.config.spec import JobSpec, ModelConfig
from moedisco.models.architecture import (
    build_moe_config,
    expert_axes,
    num_experts_of,
    read_config,
    take_experts,
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
                         f"{ARCHITECTURES} nor a dense model to upcycle {tuple(DENSE_TO_MOE)}; an MoE is added as "
                         "an ArchitectureEntry in moedisco.config.architectures.REGISTRY")
    if num_experts_of(config) != cfg.num_experts:
        raise ValueError(
            f"model.num_experts is {cfg.num_experts} but the checkpoint at {path} has {num_experts_of(config)} experts"
        )
    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)


def submodel_state(get_tensor: Callable[[str], torch.Tensor], axes: dict[str, tuple[int, ...]], first: int,
                   count: int) -> dict:
    """Shared tensors plus experts [first, first + count) of every per-expert tensor (`expert_axes`);
    `get_tensor(name)` reads one tensor."""
    return {name: take_experts(get_tensor(name), tensor_axes, first, count).clone()
            for name, tensor_axes in axes.items()}


def load_submodel(source: Path, index: int, group: int = 1) -> PreTrainedModel:
    """Submodel `index` of the MoE saved in `source`: its shared parameters and experts [index * group, (index + 1)
    * group) of every MoE layer with their router rows, routing top-k among them. Read one tensor at a time (the
    whole MoE is never loaded)."""
    config = read_config(source)
    num_experts = num_experts_of(config)
    if group < 1 or num_experts % group:
        raise ValueError(f"groups of {group} experts do not divide the model's {num_experts} experts")
    if not 0 <= index < num_experts // group:
        raise ValueError(f"submodel {index} out of range for {num_experts // group} groups of {group} experts")
    model = AutoModelForCausalLM.from_config(with_num_experts(config, group))
    axes = expert_axes(config)
    with safe_open(source / WEIGHTS_FILE, framework="pt") as weights:
        # A tied lm_head is stored once (as the embedding); tie_weights() restores it.
        present = {name: tensor_axes for name, tensor_axes in axes.items() if name in set(weights.keys())}
        model.load_state_dict(submodel_state(weights.get_tensor, present, index * group, group), strict=False)
    model.tie_weights()
    return model


def stage_source(run: StageRun) -> dict:
    tokenizer = prepare.load_tokenizer(run.paths.tokenizer)
    model = build_source_moe(run.spec, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    save_weights(model, run.paths.source)
    return {"arch": model.config.model_type, "parameters": sum(p.numel() for p in model.parameters())}
