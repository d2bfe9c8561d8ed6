"""LLaMA-MoE v1 (Zhu et al. 2024) as a transformers model, its experts stored fused (leading dimension E).

    import moedisco.models.llama_moe  # registers "llama_moe" with AutoConfig, AutoModel and AutoModelForCausalLM
    config = AutoConfig.for_model("llama_moe", vocab_size=97, hidden_size=32, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_experts=4, num_selects=2)
    model = AutoModelForCausalLM.from_config(config)
    model = AutoModelForCausalLM.from_pretrained(folder)  # also a folder in the published per-expert layout
    model(input_ids, labels=input_ids, output_router_logits=True).aux_loss  # the gate's balance loss

LLaMA with its FFN split into `num_experts` SwiGLU experts (`size_experts[layer][expert]` neurons each), routed by
the noisy top-k gate: `gate_network` logits (mlp: Linear(H, E), Tanh, Linear(E, E); linear: Linear(H, E)), plus in
training Gaussian noise scaled by softplus(weight_noise(x)) + gate_noise_epsilon; the top `num_selects`, softmaxed and
times `score_scale_factor`, weight the experts' outputs. Balance loss: cv^2(importance) + cv^2(load), summed over
layers, as `aux_loss` when `output_router_logits` is set; `loss` then gains `router_aux_loss_coef` times it.

Tensors, published (pjlab-sys4nlp/llama-moe, modeling_llama_moe_hf.py) -> here:
    model.layers.N.mlp.gate.gate_network.0.weight [E, H], .2.weight [E, E] (linear gate: gate_network.weight)
    model.layers.N.mlp.gate.weight_noise.weight [E, H]
    model.layers.N.mlp.calculator.experts.weight_gate.J [I, H]  -> ...experts.weight_gate [E, I, H]
    model.layers.N.mlp.calculator.experts.weight_up.J   [I, H]  -> ...experts.weight_up   [E, I, H]
    model.layers.N.mlp.calculator.experts.weight_down.J [H, I]  -> ...experts.weight_down [E, H, I]
`from_pretrained` stacks the per-expert tensors (a registered checkpoint conversion); `save_pretrained` splits them
back into the published names. Folders holding the fused names load as they are.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import ConversionOps, MergeModulelist, WeightConverter
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

MODEL_TYPE = "llama_moe"


def expert_width(config: "LlamaMoeConfig") -> int:
    """The neurons of every expert. moedisco stores a layer's experts as one [E, I, H] tensor, so they must be equal;
    `size_experts` gives the width, `num_experts` the count (a resized config may still list the old count)."""
    if config.size_experts is None:
        if config.intermediate_size % config.num_experts:
            raise ValueError(f"intermediate_size {config.intermediate_size} does not split into "
                             f"{config.num_experts} equal experts; give size_experts")
        return config.intermediate_size // config.num_experts
    width = config.size_experts[0][0] if config.size_experts and config.size_experts[0] else None
    for layer, sizes in enumerate(config.size_experts or [[]]):
        if not sizes or any(size != width for size in sizes):
            raise ValueError(f"size_experts: layer {layer} has expert sizes {sizes}, layer 0 starts with {width}; "
                             "moedisco needs every expert of every layer equally wide")
    return width


@strict
class LlamaMoeConfig(LlamaConfig):
    """LlamaConfig plus the published LLaMA-MoE keys (those of the published config.json files)."""

    model_type = MODEL_TYPE
    attribute_map = {"num_experts_per_tok": "num_selects", "router_aux_loss_coef": "gate_balance_loss_weight"}

    num_experts: int = 16
    num_selects: int = 4
    size_experts: list[list[int]] | None = None
    gate_type: str = "TopKBalancedNoisyGate"
    gate_network: str = "mlp"
    gate_use_softmax: bool = True
    gate_use_balance: bool = True
    gate_balance_loss_weight: float | int = 1e-2
    gate_add_noise: bool = True
    gate_noise_epsilon: float | int = 1e-2
    calculator_type: str = "UniversalCalculator"
    multiply_gate_scores: bool = True
    score_scale_factor: float | int | list[float | int] = 1.0
    add_weight_norm: bool = False
    drop_tokens: bool = True  # SwitchDropTokenCalculator's keys: kept so published configs round-trip, unused
    dropped_padding: str = "zero"
    capacity_factor: float | int = 1.25
    output_router_logits: bool = False

    def __post_init__(self, **kwargs):
        width = kwargs.pop("moe_intermediate_size", None)  # the name other MoE configs use: equal experts of it
        kwargs.pop("auto_map", None)  # published configs name remote code; this class replaces it, saves carry none
        if width is not None and self.size_experts is None:
            self.size_experts = [[width] * self.num_experts for _ in range(self.num_hidden_layers)]
        super().__post_init__(**kwargs)
        if width is not None and width != self.moe_intermediate_size:
            raise ValueError(f"moe_intermediate_size {width} contradicts size_experts {self.size_experts}")
        implemented = {"gate_type": "TopKBalancedNoisyGate", "calculator_type": "UniversalCalculator",
                       "add_weight_norm": False}
        for key, value in implemented.items():
            if getattr(self, key) != value:
                raise ValueError(f"{key}={getattr(self, key)!r} is not implemented here (only {value!r})")
        if self.gate_network not in ("mlp", "linear"):
            raise ValueError(f"gate_network={self.gate_network!r}: expected 'mlp' or 'linear'")
        expert_width(self)
        if not 1 <= self.num_selects <= self.num_experts:
            raise ValueError(f"num_selects {self.num_selects} must be between 1 and num_experts {self.num_experts}")

    @property
    def moe_intermediate_size(self) -> int:
        return expert_width(self)


def _cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation (unbiased variance, as published): 0 for a perfectly even spread."""
    x = x.float()
    return x.var() / (x.mean() ** 2 + 1e-10) if x.numel() > 1 else x.new_zeros(())


class LlamaMoeNoise(nn.Linear):
    """The gate's `weight_noise`, a class of its own to start at zero as published (noise scale softplus(0) + eps)."""


class LlamaMoeGate(nn.Module):
    """The noisy top-k router. forward(x [T, H]) -> (router_logits [T, E], top_k_weights [T, k], top_k_indices [T, k]),
    the routing logits being the noisy ones in training (they are what the top-k picked from)."""

    def __init__(self, config: LlamaMoeConfig):
        super().__init__()
        hidden, self.num_experts, self.top_k = config.hidden_size, config.num_experts, config.num_selects
        self.use_softmax, self.noise_epsilon = config.gate_use_softmax, config.gate_noise_epsilon
        if config.gate_network == "mlp":
            self.gate_network = nn.Sequential(nn.Linear(hidden, self.num_experts, bias=False), nn.Tanh(),
                                              nn.Linear(self.num_experts, self.num_experts, bias=False))
        else:
            self.gate_network = nn.Linear(hidden, self.num_experts, bias=False)
        self.weight_noise = LlamaMoeNoise(hidden, self.num_experts, bias=False) if config.gate_add_noise else None

    def _noise_scale(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.weight_noise(x)) + self.noise_epsilon

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = self.gate_network(x)
        if self.training and self.weight_noise is not None:
            logits = logits + torch.randn_like(logits) * self._noise_scale(x)
        top_logits, top_indices = logits.topk(self.top_k, dim=-1)
        weights = top_logits.float().softmax(dim=-1).to(logits.dtype) if self.use_softmax else top_logits
        return logits, weights, top_indices

    def balance_loss(self, x, logits, weights, indices) -> torch.Tensor:
        """cv^2(importance) + cv^2(load) of the routing the gate returned (a hook may have rewritten it, so it is
        taken as given, with as many columns as it has)."""
        importance = weights.new_zeros(logits.shape).scatter(1, indices, weights).sum(0)
        k = indices.shape[1]
        if self.training and self.weight_noise is not None and k < self.num_experts:
            load = self._smooth_load(x, logits, k)
        else:
            load = torch.bincount(indices.flatten(), minlength=self.num_experts)
        return _cv_squared(importance) + _cv_squared(load)

    def _smooth_load(self, x: torch.Tensor, logits: torch.Tensor, k: int) -> torch.Tensor:
        """Each expert's expected number of tokens under the noise (Shazeer et al. 2017), differentiable in the gate.
        The clean logits and noise scale are recomputed from x: they are deterministic, the noise is logits - clean."""
        clean, scale, logits = self.gate_network(x).float(), self._noise_scale(x).float(), logits.float()
        top = logits.topk(k + 1, dim=-1).values
        threshold_in, threshold_out = top[:, k:], top[:, k - 1 : k]
        is_in = (logits - clean) > threshold_in  # as published: the noise alone is compared with the threshold
        prob_in = torch.special.ndtr((clean - threshold_in) / scale)
        prob_out = torch.special.ndtr((clean - threshold_out) / scale)
        return torch.where(is_in, prob_in, prob_out).sum(0)


class LlamaMoeExperts(nn.Module):
    """The E SwiGLU experts of a layer, fused. forward(x [T, H], top_k_indices [T, k], top_k_weights [T, k])."""

    def __init__(self, config: LlamaMoeConfig):
        super().__init__()
        experts, hidden, width = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = experts
        self.weight_gate = nn.Parameter(torch.empty(experts, width, hidden))
        self.weight_up = nn.Parameter(torch.empty(experts, width, hidden))
        self.weight_down = nn.Parameter(torch.empty(experts, hidden, width))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states, top_k_indices, top_k_weights) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for expert in range(self.num_experts):
            token, slot = torch.where(top_k_indices == expert)
            if token.numel() == 0:
                continue
            x = hidden_states[token]
            inner = self.act_fn(F.linear(x, self.weight_gate[expert])) * F.linear(x, self.weight_up[expert])
            y = F.linear(inner, self.weight_down[expert]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


class LlamaMoeCalculator(nn.Module):
    """The published "UniversalCalculator": the experts, their outputs weighted by gate score x score_scale_factor
    (or summed unweighted when multiply_gate_scores is off)."""

    def __init__(self, config: LlamaMoeConfig, layer_idx: int):
        super().__init__()
        self.experts = LlamaMoeExperts(config)
        factor = config.score_scale_factor
        self.score_scale_factor = factor[layer_idx] if isinstance(factor, list) else factor
        self.multiply_gate_scores = config.multiply_gate_scores

    def forward(self, x, top_k_indices, top_k_weights) -> torch.Tensor:
        if not self.multiply_gate_scores:  # as published: the chosen experts' outputs summed unweighted
            return self.experts(x, top_k_indices, torch.ones_like(top_k_weights))
        return self.experts(x, top_k_indices, top_k_weights * self.score_scale_factor)


class LlamaMoeSparseBlock(nn.Module):
    """A layer's MoE FFN: forward(h [..., H], with_balance_loss) -> (out [..., H], balance loss or None)."""

    def __init__(self, config: LlamaMoeConfig, layer_idx: int):
        super().__init__()
        self.gate = LlamaMoeGate(config)
        self.calculator = LlamaMoeCalculator(config, layer_idx)
        self.use_balance = config.gate_use_balance

    def forward(self, hidden_states: torch.Tensor, with_balance_loss: bool = False):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits, weights, indices = self.gate(x)  # through __call__, so forward hooks may re-route
        out = self.calculator(x, indices, weights).reshape(hidden_states.shape)
        loss = self.gate.balance_loss(x, logits, weights, indices) if with_balance_loss and self.use_balance else None
        return out, loss


class LlamaMoeDecoderLayer(GradientCheckpointingLayer):
    """LLaMA's attention and norms around the MoE FFN -> (hidden_states, balance loss or None): an output, so that
    the loss leaves a checkpointed layer with its graph."""

    def __init__(self, config: LlamaMoeConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMoeSparseBlock(config, layer_idx)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, with_balance_loss: bool = False, **kwargs):
        attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                     position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                                     position_embeddings=position_embeddings, **kwargs)
        hidden_states = hidden_states + attended
        moe_out, loss = self.mlp(self.post_attention_layernorm(hidden_states), with_balance_loss)
        return hidden_states + moe_out, loss


class LlamaMoePreTrainedModel(PreTrainedModel):
    config_class = LlamaMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaMoeDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = _supports_flash_attn = _supports_attention_backend = True
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]  # the published .bin files store it
    _can_record_outputs = {"router_logits": OutputRecorder(LlamaMoeGate, index=0),
                           "hidden_states": OutputRecorder(LlamaMoeDecoderLayer, index=0),
                           "attentions": OutputRecorder(LlamaAttention, index=1)}

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, LlamaMoeNoise):
            init.zeros_(module.weight)
        elif isinstance(module, LlamaMoeExperts):
            for weight in (module.weight_gate, module.weight_up, module.weight_down):
                init.normal_(weight, mean=0.0, std=self.config.initializer_range)
        else:
            super()._init_weights(module)  # Linear and Embedding normal(0, initializer_range), norms to one


@dataclass
class LlamaMoeModelOutputWithPast(MoeModelOutputWithPast):
    balance_loss: torch.FloatTensor | None = None  # the layers' summed balance losses (unweighted), when asked for


class LlamaMoeModel(LlamaMoePreTrainedModel):
    def __init__(self, config: LlamaMoeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(LlamaMoeDecoderLayer(config, index) for index in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_router_logits=None, **kwargs) -> LlamaMoeModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + seen).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  past_key_values=past_key_values, position_ids=position_ids)
        with_loss = bool(self.config.output_router_logits if output_router_logits is None else output_router_logits)
        hidden_states, balance_loss = inputs_embeds, None
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        # `num_hidden_layers` bounds the walk: moedisco runs one loaded layer at a time through this forward.
        for layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states, loss = layer(hidden_states, attention_mask=mask, position_ids=position_ids,
                                        past_key_values=past_key_values, use_cache=use_cache,
                                        position_embeddings=position_embeddings, with_balance_loss=with_loss, **kwargs)
            if loss is not None:
                balance_loss = loss if balance_loss is None else balance_loss + loss
        return LlamaMoeModelOutputWithPast(last_hidden_state=self.norm(hidden_states),
                                           past_key_values=past_key_values, balance_loss=balance_loss)


class LlamaMoeForCausalLM(LlamaMoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LlamaMoeConfig):
        super().__init__(config)
        self.model = LlamaMoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_router_logits=None, logits_to_keep=0,
                **kwargs) -> MoeCausalLMOutputWithPast:
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             output_router_logits=output_router_logits, **kwargs)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, keep, :])
        loss = self.loss_function(logits, labels, self.vocab_size, **kwargs) if labels is not None else None
        aux_loss = outputs.balance_loss if output_router_logits else None
        if loss is not None and aux_loss is not None:
            loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits,
                                         past_key_values=outputs.past_key_values, hidden_states=outputs.hidden_states,
                                         attentions=outputs.attentions, router_logits=outputs.router_logits)


class _StackExperts(MergeModulelist):
    """Per-expert tensors -> one [E, ...] tensor (load); its reverse, _UnstackExperts, splits them (save)."""

    @property
    def reverse_op(self) -> ConversionOps:
        return _UnstackExperts()


class _UnstackExperts(ConversionOps):
    """[E, ...] -> `<name>.0` ... `<name>.E-1`, full names built here: transformers' own split places an index only
    inside a name (`experts.*.w1`), and the published names end in it."""

    @torch.no_grad()
    def convert(self, input_dict, source_patterns, target_patterns, full_layer_name: str = "", **kwargs):
        (tensors,) = input_dict.values()
        tensor = tensors[0] if isinstance(tensors, list) else tensors
        return {f"{full_layer_name.removesuffix('*')}{index}": piece for index, piece in enumerate(tensor)}


def _published_experts(name: str) -> WeightConverter:
    # `(?=\.\d)` requires an expert index after the name, so folders with the fused names load untouched; the
    # lookahead is dropped when transformers reverses the pattern for saving, leaving `<name>.*`.
    stem = f"mlp.calculator.experts.{name}"
    return WeightConverter(source_patterns=stem + r"(?=\.\d).*", target_patterns=stem, operations=[_StackExperts(0)])


def register() -> None:
    """Make transformers know "llama_moe" (idempotent: a second import or call changes nothing)."""
    AutoConfig.register(MODEL_TYPE, LlamaMoeConfig, exist_ok=True)
    AutoModel.register(LlamaMoeConfig, LlamaMoeModel, exist_ok=True)
    AutoModelForCausalLM.register(LlamaMoeConfig, LlamaMoeForCausalLM, exist_ok=True)
    register_checkpoint_conversion_mapping(
        MODEL_TYPE, [_published_experts(name) for name in ("weight_gate", "weight_up", "weight_down")], overwrite=True)


register()
