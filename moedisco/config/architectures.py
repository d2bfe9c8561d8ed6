"""The MoE architectures moedisco splits and merges: one small registry entry each.

    entry = architecture("deepseek_v3")
    entry.count_key                      # "n_routed_experts": the config key holding the experts per MoE layer
    entry.config_keys(spec.model)        # the transformers config keys a spec's `model` section becomes
    entry.resize(config_dict, 2)         # the keys that change with the expert count, for a 2-expert submodel

Everything else about an architecture is read off the model transformers builds (which tensors are shared, per
expert or router: `moedisco.models.architecture.parameter_roles`), so an entry only says what cannot be read off:

- `count_key`: the config key of the number of routed experts per MoE layer;
- `config_keys(model)`: how the spec's widths map onto the architecture's config keys;
- `resize(config, experts)`: keys besides `count_key` and top-k that must follow the expert count (DeepSeek's
  expert groups, LLaMA-MoE's per-expert widths), called while `config` still has the old count;
- `router`: the router module's name inside a decoder layer (`mlp.gate`, gpt-oss's `mlp.router`);
- `min_group`: the fewest experts a submodel may route among (DeepSeek's router sums each group's top two scores,
  so a submodel needs two experts: `model.experts_per_submodel` >= 2);
- `expert_width_key`: the config key of an expert's FFN width (OLMoE and gpt-oss call it `intermediate_size`);
- `linear_router`: whether the router scores are one linear map of the hidden state (an [E, H] weight), which
  `merge.router_init: centroid` sets; LLaMA-MoE's gate network is two layers, and merges with `concat`.

Adding an architecture is one `ArchitectureEntry` in `REGISTRY`; a model class transformers does not ship is
registered with its Auto classes where `moedisco.models.architecture` imports it (LLaMA-MoE:
`moedisco.models.llama_moe`). This module imports neither torch nor transformers: the spec and the service read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def _no_resize(config: Any, experts: int) -> None:
    return None


@dataclass(frozen=True)
class ArchitectureEntry:
    model_type: str
    config_keys: Callable[[Any], dict]
    count_key: str = "num_experts"
    resize: Callable[[Any, int], None] = field(default=_no_resize)
    router: str = "mlp.gate"
    min_group: int = 1
    expert_width_key: str = "moe_intermediate_size"
    linear_router: bool = True


def _head_dim(model) -> int:
    return model.hidden_size // model.num_attention_heads


def _qwen2_moe(model) -> dict:
    return dict(num_experts=model.num_experts, intermediate_size=model.intermediate_size,
                moe_intermediate_size=model.moe_intermediate_size,
                shared_expert_intermediate_size=model.shared_expert_intermediate_size, decoder_sparse_step=1)


def _qwen3_moe(model) -> dict:
    return dict(num_experts=model.num_experts, intermediate_size=model.intermediate_size,
                moe_intermediate_size=model.moe_intermediate_size, decoder_sparse_step=1, head_dim=_head_dim(model))


def _expert_width_is_intermediate(key: str) -> Callable[[Any], dict]:
    """OLMoE, FlexOlmo and gpt-oss call their expert width `intermediate_size` (they have no dense FFN layers)."""
    return lambda model: {key: model.num_experts, "intermediate_size": model.moe_intermediate_size,
                          **({"head_dim": _head_dim(model)} if key == "num_local_experts" else {})}


def _deepseek_moe(model) -> dict:
    """DeepSeek-V3 and GLM-4.5: every layer an MoE with one shared expert (`first_k_dense_replace`, `n_shared_experts`
    and the rest come through `model.overrides`), no expert groups until overridden."""
    return dict(n_routed_experts=model.num_experts, moe_intermediate_size=model.moe_intermediate_size,
                intermediate_size=model.intermediate_size, n_shared_experts=1, first_k_dense_replace=0,
                n_group=1, topk_group=1)


def _deepseek_v3(model) -> dict:
    # Multi-head latent attention, sized from the head width: half of each query/key head rotates (even widths).
    head_dim = _head_dim(model)
    rope = max(2, head_dim // 2 // 2 * 2)
    return {**_deepseek_moe(model), "qk_rope_head_dim": rope, "qk_nope_head_dim": max(2, head_dim - rope),
            "v_head_dim": head_dim, "kv_lora_rank": max(8, model.hidden_size // 2), "q_lora_rank": None,
            "num_key_value_heads": model.num_attention_heads}


def _glm4_moe(model) -> dict:
    return {**_deepseek_moe(model), "head_dim": _head_dim(model)}


def _expert_groups(config: Any, experts: int) -> None:
    """DeepSeek-style group-limited routing: `n_group` groups of experts, tokens routed within `topk_group` of them.
    A smaller expert set keeps the groups' size where it divides it (a submodel of two of the full model's groups
    routes as the full model does between those two); else as many groups as divide it with two experts each (the
    router sums each group's top two scores). Top-k stays within the groups it may pick."""
    size = config.n_routed_experts // config.n_group
    if experts % size == 0 and size >= 2:
        groups = experts // size
    else:
        groups = max((g for g in range(1, min(config.n_group, experts) + 1)
                      if experts % g == 0 and experts // g >= 2), default=1)
    config.n_group, config.topk_group = groups, min(config.topk_group, groups)
    config.num_experts_per_tok = min(config.num_experts_per_tok, config.topk_group * experts // groups)


def _llama_moe(model) -> dict:
    return dict(num_experts=model.num_experts, intermediate_size=model.intermediate_size,
                size_experts=[[model.moe_intermediate_size] * model.num_experts] * model.num_hidden_layers)


def _expert_widths(config: Any, experts: int) -> None:
    """LLaMA-MoE lists every expert's width per layer; its experts are equal, so a resized list repeats the width."""
    config.size_experts = [[config.moe_intermediate_size] * experts for _ in range(config.num_hidden_layers)]


REGISTRY: dict[str, ArchitectureEntry] = {entry.model_type: entry for entry in (
    ArchitectureEntry("qwen2_moe", _qwen2_moe),
    ArchitectureEntry("mixtral", lambda model: dict(num_local_experts=model.num_experts,
                                                    intermediate_size=model.intermediate_size),
                      count_key="num_local_experts"),
    ArchitectureEntry("olmoe", _expert_width_is_intermediate("num_experts"), expert_width_key="intermediate_size"),
    ArchitectureEntry("qwen3_moe", _qwen3_moe, count_key="num_local_experts"),
    ArchitectureEntry("deepseek_v3", _deepseek_v3, count_key="n_routed_experts", resize=_expert_groups, min_group=2),
    ArchitectureEntry("glm4_moe", _glm4_moe, count_key="n_routed_experts", resize=_expert_groups, min_group=2),
    ArchitectureEntry("gpt_oss", _expert_width_is_intermediate("num_local_experts"), count_key="num_local_experts",
                      router="mlp.router", expert_width_key="intermediate_size"),
    ArchitectureEntry("flex_olmo", _expert_width_is_intermediate("num_experts"), expert_width_key="intermediate_size"),
    ArchitectureEntry("llama_moe", _llama_moe, resize=_expert_widths, linear_router=False),
)}
ARCHITECTURES = tuple(REGISTRY)


def architecture(model_type: str) -> ArchitectureEntry:
    """The registry entry of `model_type`; a ValueError naming what is missing for an unknown one."""
    if model_type not in REGISTRY:
        raise ValueError(f"model_type {model_type!r} is not an MoE moedisco knows ({', '.join(ARCHITECTURES)}): add "
                         "an ArchitectureEntry to moedisco.config.architectures.REGISTRY (its expert count key, how "
                         "the spec's widths map onto its config, its router's name)")
    return REGISTRY[model_type]


COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def expert_count(config: dict) -> int | None:
    """The number of routed experts per MoE layer in a config.json's dict: under its architecture's key, or under
    another one an older transformers wrote (qwen3_moe's was `num_experts`); None when it holds none."""
    model_type = config.get("model_type")
    keys = (REGISTRY[model_type].count_key,) if model_type in REGISTRY else ()
    found = [config[key] for key in (*keys, *COUNT_KEYS) if isinstance(config.get(key), int)
             and not isinstance(config.get(key), bool)]
    return found[0] if found else None
