"""What a spec's model is, before anything is built: its config and its parameters by role.

    config = spec_config(spec)              # the source MoE's transformers config
    parameter_counts(config)                # {"total", "shared", "per_expert", "submodel", "active"}
    largest_tensor(config)                  # values of its largest parameter
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from moedisco.config.spec import JobSpec
from moedisco.models.architecture import (
    build_moe_config,
    num_experts_of,
    parameter_roles,
    read_config,
    with_num_experts,
)
from moedisco.models.upcycle import DENSE_TO_MOE, moe_config_from_dense


def spec_config(spec: JobSpec) -> PretrainedConfig:
    """The source MoE's config: built from the spec, read from `model.pretrained`, or, when that is a dense
    checkpoint, the MoE it is upcycled into (as `split.build_source_moe` builds it)."""
    if spec.model.pretrained is not None:
        config = read_config(spec.model.pretrained)
        if config.model_type in DENSE_TO_MOE:
            return moe_config_from_dense(config, spec.model)
        # An extension or retirement delivers the pretrained base with more or fewer experts.
        return with_num_experts(config, spec.model.num_experts) if spec.method in ("extend", "retire") else config
    vocab = spec.model.overrides.get("vocab_size", spec.tokenizer.vocab_size)
    return build_moe_config(spec.model, vocab, eos_id=0, pad_id=1)


def parameter_counts(config: PretrainedConfig) -> dict[str, int]:
    with torch.device("meta"):
        shapes = {n: t.numel() for n, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    roles = parameter_roles(config)
    experts = num_experts_of(config)
    shared = sum(n for name, n in shapes.items() if roles[name] == "shared")
    per_expert = sum(n for name, n in shapes.items() if roles[name] != "shared") // experts
    return {"total": shared + experts * per_expert, "shared": shared, "per_expert": per_expert,
            "submodel": shared + per_expert, "active": shared + config.num_experts_per_tok * per_expert}


def intermediate_width(config: PretrainedConfig, name: str) -> int:
    return int(getattr(config, name, 0) or 0)


def largest_tensor(config: PretrainedConfig) -> int:
    """Values of the model's largest parameter: the embedding (or head), or a layer's stacked experts."""
    expert_width = intermediate_width(config, "moe_intermediate_size") or intermediate_width(config, "intermediate_size")
    return max(config.vocab_size, 3 * num_experts_of(config) * expert_width) * config.hidden_size
