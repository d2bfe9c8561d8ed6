"""Host memory outside training: the `source` stage builds the whole MoE on one node of its tier, and is refused
before it starts when that node (`TierConfig.node_memory_gb`) cannot hold it.

    plan = host_plans(spec)["source"]      # GB of host memory the source stage needs, and whether a node has them
    host_refusal("source", plan)           # None when it fits, else what is short and what to set
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from moedisco.config.resources import DRIVER_SLOTS_PER_NODE
from moedisco.config.spec import JobSpec
from moedisco.job.registry import STAGE, tier_of
from moedisco.models.architecture import read_config
from moedisco.models.upcycle import DENSE_TO_MOE
from moedisco.planning.model_size import largest_tensor, spec_config, spec_counts
from moedisco.training.memory import GB

# The host memory of the process a stage runs in before it builds anything: Python with torch and transformers
# imported (about half a GB), and a Ray worker's own, rounded up.
PROCESS_GB = 1.0
# Of a node's memory, the share a stage may fill: Ray's memory monitor kills a task once its node's use passes 95%
# (`RAY_memory_usage_threshold`).
NODE_FILL = 0.95


def _dense_parameters(spec: JobSpec) -> int:
    """Parameters of the dense checkpoint `model.pretrained` that `source` upcycles, else 0."""
    if spec.model.pretrained is None:
        return 0
    config = read_config(spec.model.pretrained)
    if config.model_type not in DENSE_TO_MOE:
        return 0
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def source_plan(spec: JobSpec, config: PretrainedConfig, counts: dict[str, int]) -> dict:
    """GB of host memory the `source` stage needs on one node of its tier, and whether the node has them.

    `split.build_source_moe` holds the full MoE in fp32, 4 bytes per parameter (a fresh initialisation, or a
    checkpoint loaded in fp32); upcycling a dense checkpoint, the dense model's fp32 copy sits beside it until the
    MoE is filled, with one layer's experts being copied from it (`largest_tensor`). `save_weights` writes from
    the parameters themselves, copying nothing, with the safetensors constraints.txt pins (older releases copied
    every tensor to bytes first, safetensors issue #458, doubling the peak). On top: the stage's process
    (`PROCESS_GB`); the node may fill `NODE_FILL` of its memory, less what the jobs' drivers it may host need
    (`DRIVER_SLOTS_PER_NODE` processes, on the CPU tier)."""
    tier = tier_of(spec.resources, "source")
    node_gb = tier.node_memory_gb_or_default()
    dense = _dense_parameters(spec)
    plan = {"model_gb": 4 * counts["total"] / GB,
            "upcycled_gb": 4 * (dense + largest_tensor(config)) / GB if dense else 0.0,
            "process_gb": PROCESS_GB, "parameters": counts["total"], "tier": tier.label,
            "node_memory_from": f"resources.{STAGE['source'].tier}.node_memory_gb", "node_memory_gb": node_gb}
    plan["total_gb"] = plan["model_gb"] + plan["upcycled_gb"] + PROCESS_GB
    plan["drivers_gb"] = DRIVER_SLOTS_PER_NODE * PROCESS_GB if tier.label == spec.resources.cpu_tier.label else 0.0
    plan["usable_gb"] = None if node_gb is None else node_gb * NODE_FILL - plan["drivers_gb"]
    plan["fits"] = node_gb is None or plan["total_gb"] <= plan["usable_gb"]
    return plan


def host_plans(spec: JobSpec, config: PretrainedConfig | None = None,
               counts: dict | None = None) -> dict[str, dict]:
    """Per stage that holds a whole model in host memory outside training, its plan on one node of its tier
    (`source_plan`): only `source` builds one (the merge reads and writes the experts' files a tensor at a time)."""
    config = config or spec_config(spec)
    return {"source": source_plan(spec, config, counts or spec_counts(spec, config))}


def host_refusal(stage: str, plan: dict) -> str | None:
    """Why `stage` cannot run on one node of its tier (`host_plans`), with what to do, or None when it fits."""
    if plan["fits"]:
        return None
    node_gb, field = plan["node_memory_gb"], plan["node_memory_from"]
    upcycled = f", the dense checkpoint it upcycles {plan['upcycled_gb']:.1f} GB" if plan["upcycled_gb"] else ""
    return (f"{stage}: needs {plan['total_gb']:.1f} GB of host memory on one node of tier `{plan['tier']}` (the "
            f"full MoE, {plan['parameters'] / 1e9:.2f}B parameters in fp32: {plan['model_gb']:.1f} GB{upcycled}, "
            f"+ {plan['process_gb']:g} GB for its process), but a node has {node_gb:g} GB ({field}, "
            f"{NODE_FILL:.0%} usable, {plan['drivers_gb']:g} GB of it left to the jobs' drivers it hosts): "
            f"{plan['total_gb'] - plan['usable_gb']:.1f} GB short; give the tier a node group with bigger nodes and "
            f"set {field} to their memory")
