"""One training run's settings: a `TrainConfig` per trained stage of the job spec (`moedisco.config.spec`).

    TrainConfig(steps=200, batch_size=16, lr=3e-4, schedule="wsd")     # spec.submodel, spec.finetune, ...

The memory measures at its end are what `moedisco.planning.memory_plan` picks with `memory: auto`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from moedisco.config.resources import _Section


class TrainConfig(_Section):
    steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Sequences per optimizer step (Tables 4-5: 16).")
    lr: float = Field(3e-4, gt=0.0, le=1.0, description="Peak learning rate.")
    schedule: Literal["constant", "cosine", "linear", "wsd"] = Field(
        "cosine", description="Learning-rate schedule; `wsd`: warmup-stable-decay (moedisco.training.schedule).")
    warmup_ratio: float = Field(0.03, ge=0.0, le=0.5, description="Fraction of steps of linear warm-up.")
    decay_ratio: float = Field(0.2, gt=0.0, lt=1.0, description="`wsd`: fraction of the steps that decay towards zero.")
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    grad_clip: float = Field(1.0, ge=0.0, description="Max gradient norm; 0 disables clipping.")
    # DeepSeek-V3 uses 0.001; routers without an expert bias ignore it (moedisco.training.balance).
    router_bias_rate: float = Field(0.001, ge=0.0, le=0.1, description="Auxiliary-loss-free balancing: per-step "
                                    "change of a router's expert bias (DeepSeek-V3, GLM-4.5); 0 = off.")
    eval_every: int = Field(50, ge=1, description="Steps between held-out evaluations.")
    eval_batches: int = Field(8, ge=1, description="Held-out batches per evaluation.")
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints (resume granularity).")
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints kept on disk.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto` uses CUDA when present.")
    # Memory measures (moedisco.training.memory). With `auto`, before the stage starts the planner
    # (moedisco.planning.memory_plan) picks the cheapest of the measures below that fit the stage's tier device, in
    # the order micro-batching, checkpointing, bf16-true, the 8-bit optimizer, offload, sharding, and writes them into
    # the saved spec; fields set explicitly are kept.
    memory: Literal["auto", "manual"] = Field(
        "auto",
        description="`auto`: the planner sets unset memory measures to fit the tier's device; `manual`: as written."
    )
    # Accumulating gives the same loss and gradients as one full batch, with less activation memory.
    micro_batch_size: int | None = Field(
        None, ge=1, description="Sequences per forward/backward, gradients accumulated up to `batch_size`; unset = "
        "batch_size.",
    )
    # Hugging Face gradient checkpointing, non-reentrant.
    activation_checkpointing: bool = Field(
        False, description="Recompute each layer's activations in the backward pass instead of keeping them."
    )
    # bf16-true keeps weights, gradients and optimizer states in bf16; each update's rounding error is carried in a
    # bf16 Kahan buffer (moedisco.training.memory), so that small updates are not lost.
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16-true"] = Field(
        "auto", description="`fp32`, `bf16-mixed` (autocast), `bf16-true` (all state in bf16); `auto`: bf16-mixed on "
        "CUDA, else fp32.",
    )
    # adamw-8bit is bitsandbytes' AdamW8bit, or moedisco.training.optimizer.StoredAdamW with bf16-true, offload or a
    # sharded model.
    optimizer: Literal["adamw", "adamw-8bit"] = Field(
        "adamw", description="`adamw` (torch) or `adamw-8bit`: AdamW with block-wise 8-bit moments, less memory."
    )
    # Done by moedisco.training.optimizer.StoredAdamW; on the CPU the states are in host memory already.
    offload_optimizer: bool = Field(
        False,
        description="Keep optimizer states in host memory between steps, each moved to the device for its update."
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_dtype(cls, raw: Any) -> Any:
        # Specs written before `precision` existed said `dtype: auto | fp32 | bf16` (bf16 meant autocast).
        if isinstance(raw, dict) and "dtype" in raw:
            raw = dict(raw)
            legacy = raw.pop("dtype")
            raw.setdefault("precision", {"bf16": "bf16-mixed"}.get(legacy, legacy))
        return raw

    @model_validator(mode="after")
    def _micro_batch_divides(self) -> TrainConfig:
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size ({self.micro_batch_size}) must divide batch_size "
                             f"({self.batch_size})")
        return self
