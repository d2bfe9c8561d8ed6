"""What a spec's model is, before anything is built: its config, its parameters by role, and its layers' widths.

    config = spec_config(spec)              # the source MoE's transformers config
    parameter_counts(config, group=2)       # {"total", "shared", "per_expert", "dense", "submodel", "active", ...}
    spec_counts(spec)                       # the same for the job's model and its submodels' group
    largest_tensor(config)                  # values of its largest parameter (or of one layer's stacked experts)
    model_shape(config).layers              # per decoder layer, the widths the memory planner counts

`model_shape` reads the model transformers builds from the config on the meta device (no memory): which layers are
dense and which are MoE, the attention's widths (grouped-query, or DeepSeek's multi-head latent attention), query and
key norms, shared experts, attention sinks, and the attention kernel transformers picks for it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

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


def parameter_counts(config: PretrainedConfig, group: int = 1) -> dict[str, int]:
    """Parameters of the MoE (`total`), of a token's path through it (`active`), of the one-expert model a dense
    warm-up trains (`dense`), and of a submodel of `group` experts (`submodel`) and its token's path
    (`submodel_active`)."""
    with torch.device("meta"):
        shapes = {n: t.numel() for n, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    roles = parameter_roles(config)
    experts = num_experts_of(config)
    shared = sum(n for name, n in shapes.items() if roles[name] == "shared")
    per_expert = sum(n for name, n in shapes.items() if roles[name] != "shared") // experts
    top_k = config.num_experts_per_tok
    return {"total": shared + experts * per_expert, "shared": shared, "per_expert": per_expert,
            "dense": shared + per_expert, "submodel": shared + group * per_expert,
            "submodel_active": shared + min(top_k, group) * per_expert, "active": shared + top_k * per_expert}


def submodel_group(spec: JobSpec) -> int:
    """Experts per submodel the job trains: `model.experts_per_submodel` for MoE-DisCo, one for an extension."""
    return spec.model.experts_per_submodel if spec.method == "moe_disco" else 1


def spec_counts(spec: JobSpec, config: PretrainedConfig | None = None) -> dict[str, int]:
    """`parameter_counts` of the job's model, its submodels of `submodel_group(spec)` experts."""
    return parameter_counts(config or spec_config(spec), submodel_group(spec))


@dataclass(frozen=True)
class Norm:
    """An RMSNorm of a decoder layer: the width it normalises per token, its input's storage per token (wider where
    the input is a slice: MLA's latent, split from the rotary key), its rows per token (one scale each), and what it
    keeps in 16-bit training per value and per row (`_kept_16bit`: it computes in fp32, so it keeps an fp32 copy of
    its input, and the normalised values in 16 bits, or in fp32 where it scales them before casting back)."""

    width: int
    storage: int
    rows: int = 1
    value_bytes_16bit: float = 6.0
    row_bytes_16bit: float = 4.0


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer's widths per token, as the memory planner counts what autograd keeps of it.

    Attention: `query` and `key` are the widths attention multiplies (all heads; MLA expands its latent into a key per
    head), `value` the values' width and `value_storage` the storage they are a view of (MLA: the latent's up-
    projection holds the non-rotary keys beside the values), `output` the output projection's input, `latents` the
    normalised low-rank inputs of MLA's up-projections (q_b, kv_b), `kv_groups` query heads per key/value head,
    `sinks` whether the softmax has a sink column (gpt-oss). FFN: `dense` the width of a dense layer's FFN; an MoE
    layer's `experts` routed experts of `expert_width`, `top_k` per token, `gate_values` expert-wide values each
    keeps (4 for SwiGLU: gate, up, activation, product; gpt-oss's clamped SwiGLU keeps 7), `shared` its shared
    experts' width and `shared_gate` whether a sigmoid gate scales them (Qwen2-MoE); `router_copy_16bit` the bytes
    per hidden value of the copy of its input the router keeps in 16-bit training (DeepSeek's and GLM's score in
    fp32); `expert_kernel` how the experts run: transformers' `experts_implementation` (`grouped_mm` by default,
    `eager`: a loop over the experts, `batched_mm`), `eager` for an experts module of its own (LLaMA-MoE's)."""

    hidden: int
    heads: int
    norms: tuple[Norm, ...]
    query: int
    key: int
    value: int
    value_storage: int
    output: int
    latents: int = 0
    kv_groups: int = 1
    sinks: bool = False
    dense: int = 0
    experts: int = 0
    top_k: int = 0
    expert_width: int = 0
    gate_values: int = 4
    shared: int = 0
    shared_gate: bool = False
    router_copy_16bit: float = 0.0
    expert_kernel: str = "grouped_mm"


@dataclass(frozen=True)
class ModelShape:
    """`layers`: each decoder layer's `LayerShape`; `largest`: values of the largest parameter or of one layer's
    stacked experts, whichever is larger; `attention`: the attention implementation transformers picks for it
    (`sdpa`, `eager` where the model supports no fused kernel, as gpt-oss with its sinks)."""

    layers: tuple[LayerShape, ...]
    largest: int
    attention: str


_SHAPES: dict[str, ModelShape] = {}  # per config, the 64 latest


def model_shape(config: PretrainedConfig) -> ModelShape:
    """The shape of the model `config` builds, read off it built on the meta device (cached per config)."""
    implementations = (getattr(config, "_attn_implementation", None), getattr(config, "_experts_implementation", None))
    key = config.to_json_string(use_diff=False) + repr(implementations)
    if key not in _SHAPES:
        config = copy.deepcopy(config)  # transformers writes the implementations it picks into the config it builds
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        layers = tuple(_layer_shape(layer, model.config) for layer in model.get_decoder().layers)
        stacked = [sum(p.numel() for p in module.parameters()) for name, module in model.named_modules()
                   if name.rsplit(".", 1)[-1] == "experts"]
        largest = max([p.numel() for p in model.parameters()] + stacked)
        if len(_SHAPES) >= 64:
            _SHAPES.pop(next(iter(_SHAPES)))
        _SHAPES[key] = ModelShape(layers, largest, str(model.config._attn_implementation or "sdpa"))
    return _SHAPES[key]


def largest_tensor(config: PretrainedConfig) -> int:
    """Values of the model's largest parameter: the embedding (or head), or a layer's stacked experts."""
    return model_shape(config).largest


_KEPT: dict[tuple, tuple[float, float]] = {}


def _kept_16bit(module: torch.nn.Module, width: int, rows: int = 3) -> tuple[float, float]:
    """(bytes per value, bytes per row) that `module` keeps for its backward of bf16 input rows of `width` values,
    besides the input itself and its parameters: run on the meta device (no memory, no compute), once per module
    class and size. (0, 0) for a module that does not run there."""
    key = (type(module), width, rows, tuple(p.shape for p in module.parameters()))
    if key not in _KEPT:
        _KEPT[key] = _run_kept_16bit(module, width, rows)
    return _KEPT[key]


def _run_kept_16bit(module: torch.nn.Module, width: int, rows: int) -> tuple[float, float]:
    module = copy.deepcopy(module).to(torch.bfloat16)
    x = torch.empty(rows, width, device="meta", dtype=torch.bfloat16, requires_grad=True)
    own = {p.untyped_storage()._cdata for p in [x, *module.parameters()]}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in own:
            kept[storage._cdata] = (tensor.numel(), storage.nbytes())
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            module(x)
    except Exception:  # noqa: BLE001 - a module whose forward needs real data: counted by the defaults
        return 0.0, 0.0
    return (sum(size for numel, size in kept.values() if numel == rows * width) / (rows * width),
            sum(size for numel, size in kept.values() if numel == rows) / rows)


def _norm(module: torch.nn.Module, width: int, storage: int) -> Norm:
    size = module.weight.numel()
    per_value, per_row = _kept_16bit(module, size)
    return Norm(width, storage, width // size, *((per_value, per_row) if per_value else ()))


def _out(module, name: str) -> int:
    linear = getattr(module, name, None)
    return linear.out_features if linear is not None else 0


def _clamped_gate(experts: torch.nn.Module) -> bool:
    """Whether the experts gate with their own function (gpt-oss: clamped SwiGLU, `(up + 1) * gate * sigmoid`),
    rather than transformers' default SwiGLU (or a plain `act(gate) * up`, as LLaMA-MoE's)."""
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # a transformers without fused-expert kernels: every expert is a plain SwiGLU
        return False
    gate = getattr(type(experts), "_apply_gate", None)
    return gate is not None and gate is not _default_apply_gate


def _attention_shape(attention: torch.nn.Module, config: PretrainedConfig) -> dict:
    heads = config.num_attention_heads
    output = attention.o_proj.in_features
    if hasattr(attention, "kv_a_proj_with_mqa"):  # multi-head latent attention (DeepSeek-V2/V3)
        query = _out(attention, "q_proj") or _out(attention, "q_b_proj")
        kv_latent, kv_b = attention.kv_a_layernorm.weight.numel(), attention.kv_b_proj.out_features
        q_latent = _out(attention, "q_a_proj")
        norms = [_norm(attention.kv_a_layernorm, kv_latent, attention.kv_a_proj_with_mqa.out_features)]
        norms += [_norm(attention.q_a_layernorm, q_latent, q_latent)] if q_latent else []
        return dict(heads=heads, query=query, key=query, value=output, value_storage=kv_b, output=output,
                    latents=kv_latent + q_latent, norms=norms)
    query, key, value = attention.q_proj.out_features, attention.k_proj.out_features, attention.v_proj.out_features
    norms = [_norm(norm, width, width)
             for width, norm in ((query, getattr(attention, "q_norm", None)), (key, getattr(attention, "k_norm", None)))
             if norm is not None and getattr(norm, "weight", None) is not None]
    return dict(heads=heads, query=query, key=key, value=value, value_storage=value, output=output,
                kv_groups=max(1, query // max(1, key)), sinks=hasattr(attention, "sinks"), norms=norms)


def _ffn_shape(mlp: torch.nn.Module, config: PretrainedConfig, hidden: int) -> dict:
    modules = dict(mlp.named_modules())
    experts = next((m for name, m in modules.items() if name.rsplit(".", 1)[-1] == "experts"), None)
    if experts is None:  # a dense layer (DeepSeek's and GLM's first `first_k_dense_replace`)
        return dict(dense=mlp.down_proj.in_features)
    weights = {name: p for name, p in experts.named_parameters() if p.dim() == 3}  # biases are [E, width]
    count = next(iter(weights.values())).shape[0]
    # An expert's width: its down projection's [hidden, width] (or [width, hidden]); else a third of its weights.
    down = next((p for name, p in weights.items() if "down" in name), None)
    width = down[0].numel() // hidden if down is not None else sum(p.numel() for p in weights.values()) // (
        3 * count * hidden)
    shared = next((m for name, m in modules.items() if name in ("shared_expert", "shared_experts")), None)
    router = next((m for name, m in modules.items() if name in ("gate", "router")), None)
    # transformers' fused experts (`use_experts_implementation`) run the kernel the config names; others their own
    kernel = getattr(config, "_experts_implementation", None) if hasattr(experts, "has_gate") else "eager"
    return dict(router_copy_16bit=_kept_16bit(router, hidden, rows=count + 1)[0] if router is not None else 0.0,
                expert_kernel=kernel or "grouped_mm",
                experts=count, top_k=min(config.num_experts_per_tok, count),
                expert_width=width,
                gate_values=7 if _clamped_gate(experts) else 4,
                shared=shared.down_proj.in_features if shared is not None else 0,
                shared_gate="shared_expert_gate" in modules)


def _layer_shape(layer: torch.nn.Module, config: PretrainedConfig) -> LayerShape:
    hidden = config.hidden_size
    attention = _attention_shape(layer.self_attn, config)
    # The layer's own norms (pre-norm: before attention and FFN; post-norm, as OLMo 2's: after each).
    own = [_norm(module, hidden, hidden) for name, module in layer.named_children()
           if "norm" in name and getattr(module, "weight", None) is not None]
    norms = tuple(own + attention.pop("norms"))
    return LayerShape(hidden=hidden, norms=norms, **attention, **_ffn_shape(layer.mlp, config, hidden))
