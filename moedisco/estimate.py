"""`moedisco estimate SPEC`: sizes, a memory plan per tier and a cost estimate, without training.

    result = estimate_job(load_spec("examples/qwen1.5-moe-a2.7b.yaml"))
    result["memory"]["submodel"]["fits"]        # does a submodel fit the cheap tier's device as configured?

Parameter counts come from instantiating the model on the `meta` device (no memory). The memory model, per device:
weights + gradients (fp32 master copies, 4 + 4 bytes/param) + AdamW moments (8 bytes/param, 2 with an 8-bit
optimizer) + activations of one micro-batch (bf16 on GPUs). Activations are counted per token and layer from the
tensors autograd keeps: attention projections and scores, the routed experts' and shared expert's FFN
intermediates, norms and residuals, plus the fp32 logits. `benchmarks/memory.py` checks it against measured peaks.
"""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from moedisco.config import JobSpec, TrainConfig
from moedisco.cost import flop_cost_usd
from moedisco.split import build_moe_config, num_experts_of, parameter_roles, read_config, with_num_experts

GB = 1e9
DEFAULT_UTILISATION = 0.4  # a typical achieved fraction of dense bf16 peak for small-batch transformer training


def spec_config(spec: JobSpec) -> PretrainedConfig:
    if spec.model.pretrained is not None:
        return read_config(spec.model.pretrained)
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


def _intermediate(config: PretrainedConfig, name: str) -> int:
    return int(getattr(config, name, 0) or 0)


def activation_bytes_per_token(config: PretrainedConfig, seq_len: int, bytes_per_value: int) -> float:
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = config.num_key_value_heads * head_dim
    expert_width = _intermediate(config, "moe_intermediate_size") or _intermediate(config, "intermediate_size")
    shared_width = _intermediate(config, "shared_expert_intermediate_size")
    attention = 4 * hidden + heads * head_dim + 2 * kv + 2 * heads * seq_len  # norms, q/k/v, scores + probs
    experts = config.num_experts_per_tok * (4 * expert_width + 2 * hidden)  # gate/up, act, product; in/out copies
    shared = 4 * shared_width + hidden if shared_width else 0
    per_layer = (attention + experts + shared + 4 * hidden) * bytes_per_value
    logits = config.vocab_size * 4 * 2  # fp32 logits and their gradient
    return config.num_hidden_layers * per_layer + logits


def memory_plan(params: int, config: PretrainedConfig, train: TrainConfig, seq_len: int, device_gb: float,
                on_gpu: bool = True) -> dict:
    bytes_per_value = 2 if on_gpu and train.dtype != "fp32" else 4
    tokens = train.batch_size * seq_len
    plan = {
        "weights_gb": params * 4 / GB, "gradients_gb": params * 4 / GB, "optimizer_gb": params * 8 / GB,
        "activations_gb": tokens * activation_bytes_per_token(config, seq_len, bytes_per_value) / GB,
    }
    plan["total_gb"] = sum(plan.values())
    plan["device_gb"], plan["fits"] = device_gb, plan["total_gb"] <= device_gb * 0.9
    plan["measures"] = [] if plan["fits"] else fitting_measures(plan, config, device_gb)
    return plan


def fitting_measures(plan: dict, config: PretrainedConfig, device_gb: float) -> list[str]:
    """Cheapest measures, in order, that bring the plan under 90% of the device."""
    params_gb = plan["weights_gb"] / 4  # GB per byte-per-parameter
    steps = [
        ("activation checkpointing", plan["activations_gb"] * (1 - 1 / max(1, config.num_hidden_layers))),
        ("8-bit optimizer", params_gb * 6),
        ("bf16 weights and gradients", params_gb * 4),
    ]
    total, taken = plan["total_gb"], []
    for name, saving in steps:
        if total <= device_gb * 0.9:
            break
        total -= saving
        taken.append(name)
    if total > device_gb * 0.9:
        taken.append(f"still {total:.1f} GB: shard over {math.ceil(total / (device_gb * 0.9))} devices")
    return taken


def estimate_job(spec: JobSpec, utilisation: float = DEFAULT_UTILISATION) -> dict:
    config = spec_config(spec)
    counts = parameter_counts(config)
    res, seq_len = spec.resources, spec.data.sequence_length
    cheap, dear = res.devices[res.submodel_tier.device_type], res.devices[res.finetune_tier.device_type]
    memory = {
        "submodel": memory_plan(counts["submodel"], with_num_experts(config, 1), spec.submodel, seq_len,
                                cheap.memory_gb),
        "full_moe": memory_plan(counts["total"], config, spec.finetune, seq_len, dear.memory_gb),
    }
    return {"arch": config.model_type, "num_experts": num_experts_of(config), "parameters": counts,
            "memory": memory, "cost": cost_estimate(spec, counts, utilisation)}


def _tokens(train: TrainConfig, seq_len: int) -> int:
    return train.steps * train.batch_size * seq_len


def cost_estimate(spec: JobSpec, counts: dict[str, int], utilisation: float) -> dict:
    res, seq_len = spec.resources, spec.data.sequence_length
    cheap, dear = res.submodel_tier.device_type, res.finetune_tier.device_type
    experts = spec.model.num_experts
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


def render_estimate(result: dict, console) -> None:
    from rich.table import Table

    counts = result["parameters"]
    console.print(f"[bold]{result['arch']}[/bold], {result['num_experts']} experts: "
                  f"{counts['total'] / 1e6:.2f}M parameters, {counts['active'] / 1e6:.2f}M active, "
                  f"submodel {counts['submodel'] / 1e6:.2f}M ({counts['submodel'] / counts['total']:.0%} of the MoE)")
    table = Table(title="memory plan per device (GB)")
    for column in ("model", "weights", "grads", "optimizer", "activations", "total", "device", "fits"):
        table.add_column(column)
    for name, plan in result["memory"].items():
        table.add_row(name, *(f"{plan[k]:.2f}" for k in ("weights_gb", "gradients_gb", "optimizer_gb",
                                                        "activations_gb", "total_gb", "device_gb")),
                      "yes" if plan["fits"] else "[red]no[/red]")
    console.print(table)
    for name, plan in result["memory"].items():
        if plan["measures"]:
            console.print(f"to fit {name}: " + " -> ".join(plan["measures"]))
    cost = result["cost"]
    console.print(f"cost ({cost['model']}): submodels ${cost['submodels_usd']:.2f} + fine-tune "
                  f"${cost['finetune_usd']:.2f} = ${cost['total_usd']:.2f}; full-parameter baseline "
                  f"${cost['full_parameter_usd']:.2f}")
