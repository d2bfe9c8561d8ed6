"""`moedisco estimate SPEC`: sizes, the memory plan per tier and a cost estimate, without training.

    result = estimate_job(load_spec("examples/qwen1.5-moe-a2.7b.yaml"))
    result["plan"]["submodel"]["measures"]      # what a submodel trains with to fit the cheap tier

Parameter counts come from instantiating the model on the `meta` device (no memory); the memory plan is
`moedisco.planning.memory_plan`; the cost is 6 x active parameters x tokens at a fraction of each tier's bf16 peak.
"""

from __future__ import annotations

from moedisco.config.spec import JobSpec, TrainConfig
from moedisco.models.architecture import num_experts_of, with_num_experts
from moedisco.planning.cost import flop_cost_usd
from moedisco.planning.memory_plan import memory_plan, memory_plans, parameter_counts, refusal, spec_config

DEFAULT_UTILISATION = 0.4  # a typical achieved fraction of dense bf16 peak for small-batch transformer training


def estimate_job(spec: JobSpec, utilisation: float = DEFAULT_UTILISATION, sharded: bool = True) -> dict:
    """Sizes, cost, and per tier two memory plans: `memory` as the spec is written (measures as set), and `plan`,
    what the job would actually train with (`memory: auto` resolved) under the Ray runner (`sharded`) or the
    local one, with `refused` saying why it would not run."""
    config = spec_config(spec)
    counts = parameter_counts(config)
    res, seq_len = spec.resources, spec.data.sequence_length
    cheap, dear = res.devices[res.submodel_tier.device_type], res.devices[res.finetune_tier.device_type]
    memory = {
        "submodel": memory_plan(counts["submodel"], with_num_experts(config, 1), spec.submodel, seq_len,
                                cheap.memory_gb),
        "full_moe": memory_plan(counts["total"], config, spec.finetune, seq_len, dear.memory_gb),
    }
    plans = {section: {**plan, "refused": refusal(section, tier, plan)}
             for section, (_, plan, tier) in memory_plans(spec, config, counts, sharded).items()}
    return {"arch": config.model_type, "num_experts": num_experts_of(config), "parameters": counts,
            "memory": memory, "plan": plans, "cost": cost_estimate(spec, counts, utilisation)}


def _tokens(train: TrainConfig, seq_len: int) -> int:
    return train.steps * train.batch_size * seq_len


def cost_estimate(spec: JobSpec, counts: dict[str, int], utilisation: float) -> dict:
    res, seq_len, experts = spec.resources, spec.data.sequence_length, spec.model.num_experts
    cheap, dear = res.submodel_tier.device_type, res.finetune_tier.device_type
    one_submodel = flop_cost_usd(counts["submodel"], _tokens(spec.submodel, seq_len), res.devices[cheap].bf16_tflops,
                                 utilisation, res.prices[cheap])
    fine = flop_cost_usd(counts["active"], _tokens(spec.finetune, seq_len), res.devices[dear].bf16_tflops,
                         utilisation, res.prices[dear])
    base = flop_cost_usd(counts["active"], _tokens(spec.full_parameter, seq_len), res.devices[dear].bf16_tflops,
                         utilisation, res.prices[dear])
    total = experts * one_submodel["usd"] + fine["usd"]
    return {"model": f"6 x active params x tokens at {utilisation:.0%} of bf16 peak", "utilisation": utilisation,
            "submodels_usd": experts * one_submodel["usd"], "submodel_hours": one_submodel["seconds"] / 3600,
            "finetune_usd": fine["usd"], "finetune_hours": fine["seconds"] / 3600, "total_usd": total,
            "full_parameter_usd": base["usd"], "full_parameter_hours": base["seconds"] / 3600,
            "ratio_to_full_parameter": total / base["usd"] if base["usd"] else None}


