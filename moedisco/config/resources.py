"""The job spec's `resources` section: the tiers a job's stages run on, their devices and prices.

    resources = spec.resources                              # a ResourcesConfig
    resources.submodel_tier.gpus_per_worker_needed()        # 1.0 (an rtx4090 tier)
    resources.prices[resources.finetune_tier.device_type]   # 2.28 dollars per A100-hour

Split out of `moedisco.config.spec` (which re-exports every name here, so `from moedisco.config.spec import TierConfig`
keeps working); the base class of every spec section lives here too, as the lowest of the two modules.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from moedisco.io.storage import URI


class _Section(BaseModel):
    # Unknown keys are almost always typos ("lerning_rate"), so they are errors, not silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


CPU_DEVICE_TYPE = "cpu"  # the `device_type` of a tier without accelerators

# Host memory of one node, by the device type of its tier, where a tier does not state its own `node_memory_gb`:
# the pods of k8s/rayservice.yaml (a 4090 pod 24Gi, an A100 pod 96Gi, a CPU pod 24Gi on the e2-highmem-4 the `cpu`
# price assumes: the source model of examples/llama-moe-3.5b.yaml, 19.3 GB with its process, fits). In GB of 1e9
# bytes, as `devices`' memory_gb: 24Gi is 25.8 GB, so the numbers err on the safe side.
NODE_MEMORY_GB = {"rtx4090": 24.0, "a100": 96.0, CPU_DEVICE_TYPE: 24.0}


# Jobs' drivers one node of the CPU tier hosts (the service's job actors, `ray_cluster.placement.on_driver_group`):
# a stage on that node leaves them their processes' memory (`moedisco.planning.host_memory`: `PROCESS_GB` each, an
# estimate: a driver's own memory was not measured).
DRIVER_SLOTS_PER_NODE = 2


class TierConfig(_Section):
    """Where a tier's stages run, and what each of their Ray workers asks for.

        TierConfig(label="4090", device_type="rtx4090").gpus_per_worker_needed()        # 1
        TierConfig(label="cpu", device_type="cpu").gpus_per_worker_needed()             # 0
        TierConfig(label="4090", device_type="rtx4090", simulated=True)                 # logical GPUs, torch on CPU
        TierConfig(label="cpu", device_type="cpu", node_memory_gb=64).node_memory_gb_or_default()   # 64.0
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
    # step, counted as a preemption, not as one of `max_failures`. The watcher is Ray's default; it polls every second
    # rather than 5 for a tier that says `spot` or whose label spot nodes carry (`ray_cluster.preemption`); moedisco's
    # local simulated cluster turns it off (one more process per trainer) for the others.
    spot: bool = Field(
        False,
        description="Ray: the tier's nodes may be spot / preemptible (also found from spot `node_groups` and nodes "
        "labelled market=spot); a preempted trainer checkpoints and resumes.",
    )
    # What a stage that holds a whole model outside training (`source` builds the full MoE in fp32) may use; the
    # memory planner refuses a job whose stage would not fit, before it starts, rather than let it OOM a node.
    node_memory_gb: float | None = Field(
        None, gt=0, description="Host memory of one of the tier's nodes (the smallest, if its node groups differ), "
        "in GB; unset = the default for its `device_type` ("
        + ", ".join(f"{device} {gb:g}" for device, gb in NODE_MEMORY_GB.items()) + ").",
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

    def node_memory_gb_or_default(self) -> float | None:
        """GB of host memory one node of this tier has: the field, else `NODE_MEMORY_GB` for its device type, else
        None (unknown: a stage's host memory on it goes unchecked)."""
        return self.node_memory_gb if self.node_memory_gb is not None else NODE_MEMORY_GB.get(self.device_type)


# A device type not among the defaults below gets this efficiency: the middle of what tuned stacks publish for
# large-model training on datacenter GPUs (PaLM, Chowdhery et al. 2022, Table 3: Megatron-Turing NLG 530B at 29.7%
# model FLOPs utilisation on A100s, PaLM 540B at 46.2% on TPU v4). Set your own measured figure.
DEFAULT_EFFICIENCY = 0.4


class DeviceSpec(_Section):
    memory_gb: float = Field(gt=0, description="Device memory in GB.")
    bf16_tflops: float = Field(gt=0, description="Published dense bf16 peak (fp32 accumulate), TFLOP/s.")
    # Of the FLOPs the device executes, recomputed forwards included (the FLOP model counts those itself), so
    # without activation checkpointing this is model FLOPs utilisation (MFU).
    efficiency: float = Field(DEFAULT_EFFICIENCY, gt=0, le=1, description="Achieved fraction of `bf16_tflops` in "
                              "training that the FLOP cost model assumes (hardware FLOPs utilisation).")


class NodeGroupConfig(_Section):
    """A group of identical worker nodes the autoscaler adds and removes: a KubeRay `workerGroupSpec` (k8s/), whose
    name Ray gives its nodes as the label `ray.io/node-group`. What the cloud bills is its nodes' seconds at its price.

        NodeGroupConfig(tier="4090", device_type="rtx4090", market="spot", price_per_hour=0.20)
    """

    tier: str = Field(description="Value of the tier label (`label_key`) its nodes carry.")
    device_type: str = Field(description="Key into `prices` and `devices` for its nodes' accelerator; `cpu` for none.")
    num_devices: int = Field(1, ge=1, description="Accelerators per node.")
    market: Literal["on-demand", "spot"] = Field("on-demand", description="Capacity type (Ray's `ray.io/market-type`).")
    min_nodes: int = Field(0, ge=0, description="Nodes kept even when idle (KubeRay `minReplicas`).")
    max_nodes: int = Field(8, ge=0, description="Most nodes at once (KubeRay `maxReplicas`).")
    price_per_hour: float | None = Field(
        None, ge=0, description="Dollars per node-hour; unset = `num_devices` x `prices[device_type]` (on-demand).")
    idle_timeout_s: float | None = Field(
        None, ge=0, description="Its idle nodes' timeout (KubeRay's per-group `idleTimeoutSeconds`); unset = "
        "`resources.idle_timeout_s`.")
    # Autoscaler v2 adds, among the groups that fit a request equally well, those of the highest priority first.
    priority: int = Field(0, description="Which group the autoscaler adds first when several fit (KubeRay `priority`).")

    def node_price(self, prices: dict[str, float]) -> float:
        """Dollars per node-hour: the group's own price, else its devices at the device type's price."""
        if self.price_per_hour is not None:
            return self.price_per_hour
        return self.num_devices * prices.get(self.device_type, 0.0)


class PriceChange(_Section):
    """From `since` on, a node group's nodes cost `price_per_hour` (a negotiated rate, a spot price that moved)."""

    group: str = Field(description="The node group (a key of `node_groups`).")
    since: AwareDatetime = Field(description="When the price starts to apply (with a time zone, e.g. `...Z`).")
    price_per_hour: float = Field(ge=0, description="Dollars per node-hour from `since` on.")


def _default_node_groups() -> dict[str, NodeGroupConfig]:
    # The worker groups of k8s/rayservice.yaml (tests/test_k8s_manifests.py compares them). The spot price is an
    # assumption, about half the on-demand one as community clouds list it: set your cloud's.
    return {
        "cheap-4090": NodeGroupConfig(tier="4090", device_type="rtx4090", max_nodes=8),
        "cheap-4090-spot": NodeGroupConfig(tier="4090", device_type="rtx4090", market="spot", max_nodes=8,
                                           price_per_hour=0.20, priority=1),  # the cheap tier goes to spot first
        "expensive-a100": NodeGroupConfig(tier="A100", device_type="a100", max_nodes=1, idle_timeout_s=60.0),
        # CPU-only work (the corpus split, tokenization, building the source model): never a GPU pod or the head.
        "cpu": NodeGroupConfig(tier="cpu", device_type="cpu", max_nodes=4),
    }


def _default_devices() -> dict[str, DeviceSpec]:
    # Peaks: NVIDIA's datasheets (A100: 312 dense bf16; RTX 4090, Ada whitepaper: 165.2 with the fp32 accumulate
    # training uses, 330 only with fp16 accumulate). Efficiencies are assumptions, not measurements:
    # - a100 0.4: published training runs on A100s span 0.30-0.56 (PaLM, Chowdhery et al. 2022, Table 3:
    #   Megatron-Turing NLG 530B at 29.7% model FLOPs utilisation, its own report's 113-126 TFLOP/s per GPU being
    #   36-40% of peak; Korthikanti et al. 2022, Megatron-LM: 56.3% at 1T parameters). The top of that range takes a
    #   tuned stack on huge matmuls; one A100 training a few-billion-parameter MoE in PyTorch does not reach it.
    # - rtx4090 0.3: lower, because a consumer card at its 450 W power limit holds its boost clock worse under
    #   sustained tensor-core load, and on its 24 GB a submodel trains in small micro-batches, for larger ones with
    #   an 8-bit or offloaded optimizer (`memory: auto`), whose steps take time that does no model FLOPs. The ~50%
    #   that LLMQ (arXiv 2512.15306, 2025) reports on 4090s takes a hand-written CUDA stack and 8-bit matmuls.
    return {
        "rtx4090": DeviceSpec(memory_gb=24, bf16_tflops=165.2, efficiency=0.3),
        "a100": DeviceSpec(memory_gb=80, bf16_tflops=312.0, efficiency=0.4),
    }


def _merged(defaults: dict[str, Any], given: Any) -> Any:
    """`given` over `defaults`, key by key (and field by field inside an entry that is itself a table), so that
    `--set resources.prices.rtx4090=0.29` changes one price and keeps the others; an entry given as null goes
    (`node_groups: {cheap-4090-spot: null}`: a cluster without that group)."""
    if not isinstance(given, dict):
        return given
    merged = dict(defaults)
    for key, value in given.items():
        if value is None:
            merged.pop(key, None)
            continue
        base = merged.get(key)
        if isinstance(base, BaseModel) and isinstance(value, dict):
            value = {**base.model_dump(exclude_unset=True), **value}
        merged[key] = value
    return merged


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
    cpu_tier: TierConfig = Field(
        default_factory=lambda: TierConfig(label="cpu", device_type="cpu"),
        description="CPU tier: CPU-only set-up work (the corpus split, tokenization, building the source model).",
    )
    prices: dict[str, float] = Field(
        # cpu: a node of the CPU group, 4 vCPUs and 32 GB (GCP e2-highmem-4, us-central1, on-demand list price).
        default_factory=lambda: {"rtx4090": 0.35, "a100": 2.28, "cpu": 0.181},
        description="Dollars per device-hour, by device type (paper sec. 4.4).",
    )
    devices: dict[str, DeviceSpec] = Field(
        default_factory=_default_devices,
        description="Memory, peak throughput and its achieved fraction by device type (`estimate`, the FLOP model).",
    )
    node_groups: dict[str, NodeGroupConfig] = Field(
        default_factory=_default_node_groups,
        description="The cluster's worker groups and their node-hour prices (what the billed cost uses).")
    price_changes: list[PriceChange] = Field(
        default_factory=list, description="Dated node-group prices: each applies to the node-seconds after `since`.")
    idle_timeout_s: float = Field(
        120.0, ge=0, description="Seconds an idle worker node is kept before the autoscaler removes it "
        "(KubeRay `idleTimeoutSeconds`); the billed cost gives them to the node's last user.")
    workers_per_expert: int = Field(1, ge=1, description="Ray: data-parallel workers per submodel trainer.")
    max_failures: int = Field(3, ge=0, description="Ray: restarts of a failed trainer (resumes from checkpoint).")
    # A drained node (a preemption notice, a node upgrade: k8s/'s preStop) restarts its trainer as a preemption:
    # counted here, by the driver and by Ray Train (`FailureConfig.max_preemption_failures`), never in `max_failures`.
    max_preemptions: int | None = Field(
        None, ge=0, description="Ray: restarts of a trainer after preemptions of its nodes; unset = no limit.")
    # The drain's deadline is when the node goes (k8s/'s preStop: 10 s on spot, 45 on demand); a checkpoint not in
    # place by then is not waited for, and the trainer resumes from the newest one on storage (BENCHMARKS section 12).
    notice_checkpoint_s: float | None = Field(
        None, gt=0, description="Ray: the most seconds a trainer spends on its checkpoint after a preemption notice; "
        "unset = until a second before the drain's deadline (a drain without one: until it is written).")
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
    # A cloud takes minutes to start a GPU VM and pull a multi-GB image; a quota, a spot stock-out or a node group
    # whose labels match nothing never delivers, and without a deadline such a job would hold its slot forever.
    capacity_timeout_s: float = Field(
        900.0, gt=0, description="Ray: seconds a stage waits for its tier's nodes before the job fails, naming the "
        "tier, label and resources it waited for.")

    @field_validator("prices", "devices", "node_groups", mode="before")
    @classmethod
    def _over_defaults(cls, given: Any, info) -> Any:
        return _merged(cls.model_fields[info.field_name].default_factory(), given)

    # So that `--set resources.cpu_tier.node_memory_gb=64` changes one field of the tier and keeps its label.
    @field_validator("submodel_tier", "finetune_tier", "cpu_tier", mode="before")
    @classmethod
    def _tier_over_default(cls, given: Any, info) -> Any:
        default = cls.model_fields[info.field_name].default_factory()
        return {**default.model_dump(exclude_unset=True), **given} if isinstance(given, dict) else given

    @field_validator("prices")
    @classmethod
    def _non_negative(cls, prices: dict[str, float]) -> dict[str, float]:
        bad = [name for name, price in prices.items() if price < 0]
        if bad:
            raise ValueError(f"prices must be >= 0 (negative: {', '.join(bad)})")
        return prices

    @model_validator(mode="after")
    def _tiers_priced(self) -> ResourcesConfig:
        for tier in (self.submodel_tier, self.finetune_tier, self.cpu_tier):
            if tier.device_type not in self.prices:
                raise ValueError(f"device_type {tier.device_type!r} has no entry in prices")
        for name, group in self.node_groups.items():
            if group.price_per_hour is None and group.device_type not in self.prices:
                raise ValueError(f"node group {name!r}: device_type {group.device_type!r} has no entry in prices "
                                 "and the group has no price_per_hour")
        unknown = sorted({change.group for change in self.price_changes} - set(self.node_groups))
        if unknown:
            raise ValueError(f"price_changes name node groups not in node_groups: {', '.join(unknown)}")
        return self

    def group_price(self, group: str, at: float) -> float:
        """Dollars per node-hour of `group` at unix time `at`: the latest price change before it, else its price."""
        since = datetime.fromtimestamp(at, timezone.utc)
        changes = [c for c in self.price_changes if c.group == group and c.since <= since]
        if changes:
            return max(changes, key=lambda change: change.since).price_per_hour
        return self.node_groups[group].node_price(self.prices)

    def idle_timeout(self, group: str) -> float:
        """Seconds an idle node of `group` is kept: its own timeout, else the cluster's."""
        own = self.node_groups[group].idle_timeout_s if group in self.node_groups else None
        return self.idle_timeout_s if own is None else own

    def price_steps(self, group: str) -> list[float]:
        """Unix times at which `group`'s price changes (the billing splits node time there)."""
        return sorted(change.since.timestamp() for change in self.price_changes if change.group == group)


__all__ = ["CPU_DEVICE_TYPE", "DRIVER_SLOTS_PER_NODE", "NODE_MEMORY_GB", "DeviceSpec", "NodeGroupConfig",
           "PriceChange", "ResourcesConfig", "TierConfig"]
