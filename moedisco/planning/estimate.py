"""`moedisco estimate SPEC`: sizes, the memory plan per tier and a cost estimate, without training.

    result = estimate_job(load_spec("examples/qwen1.5-moe-a2.7b.yaml"))
    result["plan"]["submodel"]["measures"]      # what a submodel trains with to fit the cheap tier
    result["host"]["source"]["refused"]         # why the full MoE does not fit one node of the cpu tier, or None
    result["cost"]["total_usd"], result["cost"]["model"]      # the cost, and the assumptions it rests on
    estimate_job(spec, hours={"submodel": 2.09, "finetune": 1.73, "full_parameter": 9.87})["cost"]  # measured

Parameter counts come from instantiating the model on the `meta` device (no memory); the memory plan is
`moedisco.planning.memory_plan`, per device for the training stages, per node (host memory) for `source`. The
cost prices each trained stage (the shared warm-up, one submodel, the fine-tune, the full-parameter baseline)
under one of two conventions:
  - `flop`: its FLOPs (`moedisco.planning.cost.flop_cost_usd`: 6 x parameters x tokens, 8 where its memory plan
    turns activation checkpointing on) at its device's `efficiency` of peak, at its tier's price;
  - `paper`: measured wall hours, given per stage, at its tier's price: the paper's Table 3, where the submodels
    cost E x the slowest submodel's hours (all E are paid for until the last one ends).
Either way the job costs warm-up + E x one submodel + fine-tune; the submodels train at once, so its hours are
warm-up + one submodel + fine-tune.
"""

from __future__ import annotations

import json
import math

from transformers import PretrainedConfig

from moedisco.config.resources import DeviceSpec
from moedisco.config.spec import JobSpec
from moedisco.job.registry import STAGE, tier_of
from moedisco.models.architecture import num_experts_of, with_num_experts
from moedisco.models.experts import with_checkpoint_model
from moedisco.planning.cost import flop_cost_usd
from moedisco.planning.host_memory import host_plans, host_refusal
from moedisco.planning.memory_plan import memory_plan, memory_plans, refusal, stage_devices
from moedisco.planning.model_size import spec_config, spec_counts, submodel_group

CONVENTIONS = ("flop", "paper")
PRICED_STAGES = ("warmup", "submodel", "finetune", "full_parameter")  # the stages the estimate prices


class EstimateError(ValueError):
    """An estimate option that cannot be used (a convention, measured hours); the message names it."""


def estimate_job(spec: JobSpec, sharded: bool = True, hours: dict[str, float] | None = None,
                 convention: str | None = None) -> dict:
    """Sizes, cost, and per tier two memory plans: `memory` as the spec is written (measures as set), and `plan`,
    what the job would actually train with (`memory: auto` resolved) under the Ray runner (`sharded`) or the
    local one, with `refused` saying why it would not run; `host`: the host memory of `source` on one node of its
    tier (`host_memory.host_plans`), with its `refused`. `hours`: measured wall hours per stage of
    `PRICED_STAGES` (`submodel`: the slowest submodel's) for the `paper` convention; `convention` unset: `paper`
    when hours are given, else `flop`."""
    if spec.method == "retire":
        raise EstimateError("method 'retire' trains nothing and reads no corpus: there is nothing to estimate")
    try:  # an extension's model: the base's, with its new experts
        spec = with_checkpoint_model(spec)
    except ValueError as error:
        raise EstimateError(str(error)) from None
    hours = dict(hours or {})
    convention = _convention(hours, convention)
    if convention == "paper":
        _check_hours(spec, hours)
    config = spec_config(spec)
    counts = spec_counts(spec, config)
    plans = {section: {**plan, "refused": refusal(section, tier, plan)}
             for section, (_, plan, tier) in memory_plans(spec, config, counts, sharded).items()}
    host = {stage: {**plan, "refused": host_refusal(stage, plan)}
            for stage, plan in host_plans(spec, config, counts).items()}
    cost = (measured_cost(spec, hours, sharded) if convention == "paper"
            else flop_cost(spec, counts, _recomputes(spec, config, counts, plans, sharded), sharded))
    return {"arch": config.model_type, "num_experts": num_experts_of(config),
            "experts_per_submodel": submodel_group(spec), "parameters": counts,
            "recipe": _recipe(spec), "memory": _memory_as_written(spec, config, counts), "plan": plans,
            "host": host, "cost": cost}


def _recipe(spec: JobSpec) -> dict:
    """How long each phase trains: as written, or chosen from the baseline budget (`recipe: auto`)."""
    return {"recipe": spec.recipe, "submodel_steps": spec.submodel.steps, "sync_rounds": spec.branch.sync_rounds,
            "finetune_steps": spec.finetune.steps, "full_parameter_steps": spec.full_parameter.steps}


def _memory_as_written(spec: JobSpec, config: PretrainedConfig, counts: dict[str, int]) -> dict:
    """A submodel on one cheap device and the full MoE on one expensive one, with the measures as set."""
    res, seq_len = spec.resources, spec.data.sequence_length
    cheap, dear = res.devices[res.submodel_tier.device_type], res.devices[res.finetune_tier.device_type]
    return {
        "submodel": memory_plan(counts["submodel"], with_num_experts(config, submodel_group(spec)), spec.submodel,
                                seq_len, cheap.memory_gb),
        "full_moe": memory_plan(counts["total"], config, spec.finetune, seq_len, dear.memory_gb),
    }


def _convention(hours: dict[str, float], convention: str | None) -> str:
    convention = convention or ("paper" if hours else "flop")
    if convention not in CONVENTIONS:
        raise EstimateError(f"unknown cost convention {convention!r}: expected one of {', '.join(CONVENTIONS)}")
    if convention == "flop" and hours:
        raise EstimateError("measured hours are priced only under the `paper` convention (the `flop` convention "
                            "computes each stage's hours from its FLOPs)")
    return convention


def _priced_stages(spec: JobSpec) -> list[str]:
    warmup = spec.branch.warmup_steps > 0 and spec.method == "moe_disco"  # an extension has none
    return [stage for stage in PRICED_STAGES if stage != "warmup" or warmup]


def cost_estimate(spec: JobSpec) -> dict:
    """`estimate_job(spec)["cost"]`, and for a retirement, which trains nothing, a cost of 0."""
    if spec.method == "retire":
        return _summary(spec, "flop", "a retirement trains nothing: no stage is priced", {})
    return estimate_job(spec)["cost"]


def job_flop_usd(spec: JobSpec) -> float:
    """A job's dollars under the FLOP model, without activation checkpointing's recomputation (what the planner
    turns on depends on the devices, which a re-run may change)."""
    config = spec_config(spec)
    return flop_cost(spec, spec_counts(spec, config), {})["total_usd"]


def rerun_estimate(spec: JobSpec, ledger_usd: float | None = None) -> dict | None:
    """An extension (`method: extend`, its spec as `with_checkpoint_model` resolves it) against running its lineage's
    first job again on the union of the corpora with every expert: that job's recipe at the extended model's expert
    count. Under the FLOP model both are priced alike; the first job's ledger dollars, scaled by the FLOP ratio of
    the re-run to it, stand for the re-run's bill beside this job's `ledger_usd`. None for other methods or a
    base that is a bare model folder (no job to re-run)."""
    from moedisco.config.loading import load_saved_spec
    from moedisco.stages.domains import lineage

    jobs = lineage(spec.extend.base) if spec.method == "extend" else []
    if not jobs:
        return None
    first_job = jobs[0].folder
    first = load_saved_spec(first_job / "spec.yaml")
    experts, group = spec.model.num_experts, first.model.experts_per_submodel
    group = group if experts % group == 0 else 1  # the first job's groups, where they still divide the experts
    rerun = first.model_copy(update={"model": first.model.model_copy(
        update={"num_experts": experts, "experts_per_submodel": group})})
    first_flop, rerun_flop, flop = job_flop_usd(first), job_flop_usd(rerun), job_flop_usd(spec)
    ledger = first_job / "cost.json"
    first_ledger = json.loads(ledger.read_text()).get("total_usd") if ledger.is_file() else None
    rerun_ledger = first_ledger * rerun_flop / first_flop if first_ledger else None
    return {"rerun_job": str(first_job), "rerun_experts": spec.model.num_experts,
            "flop_usd": flop, "rerun_flop_usd": rerun_flop, "flop_share": flop / rerun_flop,
            "ledger_usd": ledger_usd, "rerun_ledger_usd": rerun_ledger,
            "ledger_share": ledger_usd / rerun_ledger if ledger_usd is not None and rerun_ledger else None}


def _check_hours(spec: JobSpec, hours: dict[str, float]) -> None:
    """Measured hours name the stages the job prices, each a finite number >= 0, and all of them."""
    unknown = sorted(set(hours) - set(PRICED_STAGES))
    if unknown:
        raise EstimateError(f"measured hours for unknown stage {', '.join(map(repr, unknown))}: expected "
                            f"{', '.join(PRICED_STAGES)}")
    for stage, value in hours.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise EstimateError(f"measured hours for {stage} must be a finite number >= 0, got {value!r}")
    priced = _priced_stages(spec)
    if "warmup" in hours and "warmup" not in priced:
        raise EstimateError("measured hours for warmup, but the spec has no warm-up (branch.warmup_steps is 0)")
    missing = [stage for stage in priced if stage not in hours]
    if missing:
        raise EstimateError(f"the `paper` convention needs measured hours for {', '.join(priced)} (missing: "
                            f"{', '.join(missing)})")


def _recomputes(spec: JobSpec, config: PretrainedConfig, counts: dict[str, int], plans: dict,
                sharded: bool) -> dict[str, bool]:
    """Per TrainConfig section, whether it trains with activation checkpointing as the planner resolves it: the
    job's own `plans`, and the other method's sections planned too, since the estimate prices both methods."""
    other = spec.model_copy(update={"method": "moe_disco" if spec.method == "full_parameter" else "full_parameter"})
    planned = {section: plan for section, (_, plan, _) in memory_plans(other, config, counts, sharded).items()}
    return {section: plan["measures"]["activation_checkpointing"] for section, plan in {**planned, **plans}.items()}


def _stage_device(spec: JobSpec, stage: str, sharded: bool) -> tuple[str, int, float]:
    """(device type, devices one run of `stage` trains on, dollars per device-hour)."""
    device_type = tier_of(spec.resources, stage).device_type
    num_devices, _ = stage_devices(spec, STAGE[stage].train_config, sharded)
    return device_type, num_devices, spec.resources.prices[device_type]


def _stage_work(spec: JobSpec, counts: dict[str, int], stage: str) -> tuple[int, int]:
    """(active parameters, tokens) of one run of `stage`. The warm-up trains `branch.warmup_steps` steps of the
    submodel section's batch: a submodel (`warmup_model: dense`) or the whole MoE (`moe`)."""
    train = getattr(spec, STAGE[stage].train_config)
    steps = spec.branch.warmup_steps if stage == "warmup" else train.steps
    active = ("submodel_active" if stage == "submodel" else
              "dense" if stage == "warmup" and spec.branch.warmup_model == "dense" else "active")
    return counts[active], steps * train.batch_size * spec.data.sequence_length


def _device_spec(spec: JobSpec, stage: str, device_type: str) -> DeviceSpec:
    device = spec.resources.devices.get(device_type)
    if device is None:
        raise EstimateError(f"{stage}: resources.devices has no entry for device type {device_type!r}; the FLOP "
                            "model needs its bf16_tflops and efficiency")
    return device


def flop_stage(spec: JobSpec, counts: dict[str, int], stage: str, recompute: bool, sharded: bool) -> dict:
    """One run of `stage` under the FLOP model; its wall `hours` assume its devices share the work evenly."""
    device_type, num_devices, price = _stage_device(spec, stage, sharded)
    device = _device_spec(spec, stage, device_type)
    params, tokens = _stage_work(spec, counts, stage)
    flop = flop_cost_usd(params, tokens, device, price, recompute)
    device_hours = flop["seconds"] / 3600.0
    return {"device_type": device_type, "num_devices": num_devices, "price_per_hour": price,
            "hours": device_hours / num_devices, "device_hours": device_hours, "usd": flop["usd"],
            "params": params, "tokens": tokens, "flops": flop["flops"], "recompute": recompute,
            "efficiency": device.efficiency, "bf16_tflops": device.bf16_tflops}


def flop_cost(spec: JobSpec, counts: dict[str, int], recomputes: dict[str, bool], sharded: bool = True) -> dict:
    """The `flop` convention: every priced stage's FLOPs at its device's efficiency (`flop_stage`)."""
    stages = {stage: flop_stage(spec, counts, stage, recomputes.get(STAGE[stage].train_config, False), sharded)
              for stage in _priced_stages(spec)}
    by_device = {entry["device_type"]: entry for entry in stages.values()}
    devices = "; ".join(f"{name} at {entry['efficiency']:.0%} of {entry['bf16_tflops']:g} TFLOP/s"
                        for name, entry in by_device.items())
    recomputed = [stage for stage, entry in stages.items() if entry["recompute"]]
    model = (f"FLOP model: 6 x active parameters x tokens, 8 with activation checkpointing (recomputed: "
             f"{', '.join(recomputed) or 'none'}); {devices}")
    return _summary(spec, "flop", model, stages)


def measured_stage(spec: JobSpec, stage: str, hours: float, sharded: bool) -> dict:
    """One run of `stage` that took `hours` of wall time on each of its devices."""
    device_type, num_devices, price = _stage_device(spec, stage, sharded)
    return {"device_type": device_type, "num_devices": num_devices, "price_per_hour": price, "hours": hours,
            "device_hours": hours * num_devices, "usd": hours * num_devices * price}


def measured_cost(spec: JobSpec, hours: dict[str, float], sharded: bool = True) -> dict:
    """The `paper` convention (Table 3): measured wall hours per stage at its tier's price; `hours["submodel"]`
    is the slowest submodel's, paid E times."""
    stages = {stage: measured_stage(spec, stage, hours[stage], sharded) for stage in _priced_stages(spec)}
    sub = stages["submodel"]
    model = (f"measured hours, the paper's convention: submodels = {spec.num_clusters} x the slowest "
             f"submodel's {sub['hours']:g} h on {sub['device_type']} at ${sub['price_per_hour']:g}/h; fine-tune and "
             f"baseline hours on {stages['finetune']['device_type']} at ${stages['finetune']['price_per_hour']:g}/h")
    return _summary(spec, "paper", model, stages)


def _summary(spec: JobSpec, convention: str, model: str, stages: dict[str, dict]) -> dict:
    none = {"usd": 0.0, "hours": 0.0}
    warmup, one, fine, base = (stages.get(stage, none) for stage in PRICED_STAGES)
    submodels = spec.num_clusters * one["usd"]
    total = warmup["usd"] + submodels + fine["usd"]
    return {"convention": convention, "model": model, "stages": stages,
            "warmup_usd": warmup["usd"], "warmup_hours": warmup["hours"],
            "submodels_usd": submodels, "submodel_hours": one["hours"],
            "finetune_usd": fine["usd"], "finetune_hours": fine["hours"], "total_usd": total,
            "total_hours": warmup["hours"] + one["hours"] + fine["hours"],  # the submodels train at once
            "full_parameter_usd": base["usd"], "full_parameter_hours": base["hours"],
            "ratio_to_full_parameter": total / base["usd"] if base["usd"] else None}
