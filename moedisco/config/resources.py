"""The job spec's `resources` section: the tiers a job's stages run on, their devices and prices.

    resources = spec.resources                              # a ResourcesConfig
    resources.submodel_tier.gpus_per_worker_needed()        # 1.0 (an rtx4090 tier)
    resources.prices[resources.finetune_tier.device_type]   # 2.28 dollars per A100-hour

Split out of `moedisco.config.spec` (which re-exports every name here, so `from moedisco.config.spec import TierConfig`
keeps working); the base class of every spec section lives here too, as the lowest of the two modules.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moedisco.io.storage import URI


class _Section(BaseModel):
    # Unknown keys are almost always typos ("lerning_rate"), so they are errors, not silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


CPU_DEVICE_TYPE = "cpu"  # the `device_type` of a tier without accelerators


class TierConfig(_Section):
    """Where a tier's stages run, and what each of their Ray workers asks for.

        TierConfig(label="4090", device_type="rtx4090").gpus_per_worker_needed()        # 1
        TierConfig(label="cpu", device_type="cpu").gpus_per_worker_needed()             # 0
        TierConfig(label="4090", device_type="rtx4090", simulated=True)                 # logical GPUs, torch on CPU
    """

    label: str = Field(description="Value of the node label `gpu_type` the tier's nodes carry.")
    device_type: str = Field(description="Key into `prices` and `devices` for this tier's accelerator; `cpu` for "
                             "a tier without one.")
    num_devices: int = Field(1, ge=1, description="Devices one stage task uses on this tier (the fine-tune runs "
                             "one worker per device).")
    # Declared, not read from the nodes alive at job start, so that a tier scaled from zero pods gets its GPUs and
    # its pending requests tell the autoscaler which pods to add.
    gpus_per_worker: float | None = Field(
        None, ge=0,
        description="Ray: GPUs each worker of this tier asks for; unset = 1 for an accelerator `device_type`, 0 for "
        "`cpu`.",
    )
    # Workers still ask for the logical GPUs, so placement is as on a real cluster, but CUDA is hidden from them, so a
    # real local GPU is never shared unaccounted; the ledger prices their wall time, marked `simulated: true`.
    simulated: bool = Field(
        False,
        description="Ray: the tier's GPUs are logical (the local simulated cluster, tests); torch runs on the CPU.",
    )
    # A notice (a drain: KubeRay's preStop `ray drain-node`, or the cloud's) reaches the training loop through Ray
    # Train's preemption watcher; the loop checkpoints its step and exits, and only that expert starts again, from that
    # step, counted as a preemption, not as one of `max_failures`. The watcher is Ray's default; moedisco's local
    # simulated cluster turns it off (one more process per trainer) unless a tier of the job says `spot`.
    spot: bool = Field(
        False,
        description="Ray: the tier's nodes may be spot / preemptible; a preempted trainer checkpoints and resumes.",
    )

    @model_validator(mode="after")
    def _cpu_has_no_gpus(self) -> TierConfig:
        if self.device_type == CPU_DEVICE_TYPE and self.gpus_per_worker:
            raise ValueError(f"gpus_per_worker is {self.gpus_per_worker}, but a `cpu` tier has no GPUs")
        return self

    def gpus_per_worker_needed(self) -> float:
        """The GPUs a worker of this tier asks Ray for (the override, else from `device_type`)."""
        if self.gpus_per_worker is not None:
            return self.gpus_per_worker
        return 0.0 if self.device_type == CPU_DEVICE_TYPE else 1.0


class DeviceSpec(_Section):
    memory_gb: float = Field(gt=0, description="Device memory in GB.")
    bf16_tflops: float = Field(gt=0, description="Published dense bf16 peak, TFLOP/s.")


class ResourcesConfig(_Section):
    label_key: str = Field("gpu_type", min_length=1, description="Node label that names the tier.")
    submodel_tier: TierConfig = Field(
        default_factory=lambda: TierConfig(label="4090", device_type="rtx4090"),
        description="Cheap tier: submodel training (and the shared warm-up).",
    )
    finetune_tier: TierConfig = Field(
        default_factory=lambda: TierConfig(label="A100", device_type="a100"),
        description="Expensive tier: fine-tune and full-parameter baseline.",
    )
    prices: dict[str, float] = Field(
        default_factory=lambda: {"rtx4090": 0.35, "a100": 2.28, "cpu": 0.0},
        description="Dollars per device-hour, by device type (paper sec. 4.4).",
    )
    devices: dict[str, DeviceSpec] = Field(
        default_factory=lambda: {
            "rtx4090": DeviceSpec(memory_gb=24, bf16_tflops=165.2),
            "a100": DeviceSpec(memory_gb=80, bf16_tflops=312.0),
        },
        description="Memory and peak throughput by device type (for `estimate` and the FLOP cost model).",
    )
    workers_per_expert: int = Field(1, ge=1, description="Ray: data-parallel workers per submodel trainer.")
    max_failures: int = Field(3, ge=0, description="Ray: restarts of a failed trainer (resumes from checkpoint).")
    # The data shards are the data stages' Parquet files.
    storage_path: URI | Path | None = Field(
        None, description="Ray: shared storage for checkpoints and data shards, a folder or `s3://`/`gs://` URI; unset "
        "= output_dir.")
    # Each submitted trainer's pending placement group is demand the autoscaler sees, so a cap is also the most pods
    # the job asks for at once.
    max_parallel: int | None = Field(
        None, ge=1,
        description="Ray: most trainers of one stage (the experts of a round) submitted at once; unset = all.",
    )
    # Unset: asked of the cluster, which autoscales when an autoscaler has reported its state to the head (KubeRay's
    # `enableInTreeAutoscaling` with autoscaler v2). Without one, a job whose tier label no alive node carries fails
    # at once, naming the label, instead of waiting.
    autoscaling: bool | None = Field(
        None, description="Ray: whether the cluster adds nodes on demand; unset = ask the cluster."
    )

    @field_validator("prices")
    @classmethod
    def _non_negative(cls, prices: dict[str, float]) -> dict[str, float]:
        bad = [name for name, price in prices.items() if price < 0]
        if bad:
            raise ValueError(f"prices must be >= 0 (negative: {', '.join(bad)})")
        return prices

    @model_validator(mode="after")
    def _tiers_priced(self) -> ResourcesConfig:
        for tier in (self.submodel_tier, self.finetune_tier):
            if tier.device_type not in self.prices:
                raise ValueError(f"device_type {tier.device_type!r} has no entry in prices")
        return self


__all__ = ["CPU_DEVICE_TYPE", "DeviceSpec", "ResourcesConfig", "TierConfig"]
