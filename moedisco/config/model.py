"""The MoE model a job trains: its architecture (a `moedisco.config.architectures` entry) and sizes, or a checkpoint.

    ModelConfig(arch="deepseek_v3", num_experts=64, num_experts_per_tok=6, experts_per_submodel=8)   # spec.model
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from moedisco.config.architectures import ARCHITECTURES, REGISTRY, architecture
from moedisco.config.resources import _Section

Architecture = Literal[ARCHITECTURES]  # moedisco.config.architectures.REGISTRY


class ModelConfig(_Section):
    arch: Architecture = Field(
        "qwen2_moe", description="Hugging Face MoE architecture (`model_type`)."
    )
    pretrained: Path | None = Field(
        None, description="Local pretrained MoE checkpoint folder; unset builds the model from this config."
    )
    num_experts: int = Field(4, ge=2, le=256, description="Experts per MoE layer.")
    # Fine-grained MoEs (64-256 small experts) train in groups: submodel k is the backbone with experts
    # [k*g, (k+1)*g) and the router among them; num_experts / g clusters, one per submodel.
    experts_per_submodel: int = Field(
        1, ge=1, description="Experts each submodel trains (g), routed among by their router rows; 1 = the paper's.")
    num_experts_per_tok: int = Field(2, ge=1, description="Experts each token is routed to (top-k).")
    hidden_size: int = Field(64, ge=8, description="Model width.")
    intermediate_size: int = Field(128, ge=8, description="FFN width of dense layers (and Mixtral's experts).")
    moe_intermediate_size: int = Field(64, ge=8, description="Expert FFN width (Qwen/OLMoE families).")
    shared_expert_intermediate_size: int = Field(64, ge=8, description="Shared expert FFN width (qwen2_moe).")
    num_hidden_layers: int = Field(2, ge=1, description="Transformer layers.")
    num_attention_heads: int = Field(4, ge=1, description="Attention heads.")
    num_key_value_heads: int = Field(2, ge=1, description="Key/value heads (grouped-query attention).")
    max_position_embeddings: int = Field(4096, ge=8, description="Longest position the model supports.")
    router_aux_loss_coef: float = Field(0.01, ge=0.0, description="Load-balancing loss weight in the fine-tune.")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Extra Hugging Face config keys, passed through unchanged."
    )

    @field_validator("arch", mode="before")
    @classmethod
    def _known_architecture(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in REGISTRY:
            architecture(value)  # a ValueError naming the registry an architecture is added to
        return value

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError("num_experts_per_tok must be <= num_experts")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
        if self.num_experts % self.experts_per_submodel:
            raise ValueError(f"experts_per_submodel ({self.experts_per_submodel}) must divide num_experts "
                             f"({self.num_experts}): every submodel trains the same number of experts")
        return self
