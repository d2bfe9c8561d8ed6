"""The memory plan: what a training stage needs per device, and the cheapest memory measures that make it fit.

    plan = memory_plan(params, config, spec.submodel, seq_len=256, device_gb=24)   # GB per part, and whether it fits
    spec = resolve_memory(spec)      # `memory: auto` resolved per stage, or `MemoryFitError` naming the shortfall

Per device: weights and optimizer state in the bytes per parameter the measures give, plus the largest of the
step's phases (the forward's kept activations, counted per token and layer from the tensors autograd keeps, each
layer as the model is built: dense or MoE, its attention's and experts' widths, `model_size.model_shape`; the
backward's gradients; the optimizer step's working set). `plan_measures` climbs `LADDER` on the devices the runner
gives a stage (`stage_devices`), then shards, until it fits. `benchmarks/memory.py` checks the model against
measured peaks, tests/test_memory_archs.py each architecture's plan against a measured training step. Outside
training, `source` builds the whole MoE in host memory: `moedisco.planning.host_memory` checks it against the memory
of one node of its tier.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml
from transformers import PretrainedConfig

from moedisco.config.loading import SpecError
from moedisco.config.resources import CPU_DEVICE_TYPE, TierConfig
from moedisco.config.spec import JobSpec, TrainConfig
from moedisco.job.layout import JobPaths, is_done
from moedisco.job.registry import STAGE, plan, tier_of
from moedisco.models.architecture import (
    with_num_experts,
)
from moedisco.planning.host_memory import host_plans, host_refusal
from moedisco.planning.model_size import (
    LayerShape,
    largest_tensor,
    model_shape,
    spec_config,
    spec_counts,
    submodel_group,
)
from moedisco.training.memory import GB, measures_of

# Of a device's memory, the share a plan may fill: the rest is the allocator's fragmentation and the runtime's own.
FILL = 0.9



# The planner's ladder, cheapest first: micro-batching costs no quality (only speed), checkpointing costs a
# recomputed forward, bf16-true and the 8-bit optimizer cost precision, offload costs host-device transfers, and
# sharding costs devices.
LADDER = (("activation_checkpointing", True), ("precision", "bf16-true"), ("optimizer", "adamw-8bit"),
          ("offload_optimizer", True))



# The measures that shape what a training run's checkpoints hold: the weights' dtype (precision) and the optimizer
# state's format (optimizer, offload_optimizer). Micro-batches and checkpointing change nothing saved.
CHECKPOINTED_MEASURES = ("precision", "optimizer", "offload_optimizer")



def _layer_bytes(layer: LayerShape, attention: str, seq_len: int, value_bytes: int, on_gpu: bool) -> float:
    """What autograd keeps of one decoder layer per token, in bytes (`layer_bytes`)."""
    hidden, heads, values = layer.hidden, layer.heads, value_bytes
    # Each RMSNorm keeps its input, the normalised values and an fp32 scale per row; in 16-bit training what it
    # keeps per value as measured on the meta device (`Norm`: an fp32 copy of its input, as it computes in fp32).
    kept = sum(4 * (norm.storage + norm.width + norm.rows) if values == 4 else
               norm.width * norm.value_bytes_16bit + norm.rows * norm.row_bytes_16bit for norm in layer.norms)
    # Linear layers keep their inputs: attention's and the FFN's, MLA's normalised latents, the attention output.
    kept += (2 * hidden + layer.latents + layer.output) * values
    # Attention keeps the (rotated) queries and keys and the values. SDPA's fused kernels keep nothing more than a
    # log-sum-exp per head. Eager attention (the model's only one, as gpt-oss's) keeps the softmax's probabilities:
    # in fp32 (transformers' softmax) and, in 16-bit training, their cast (gpt-oss softmaxes in the run's dtype,
    # over one more column: the sink); it repeats keys and values for every query head. On the CPU, SDPA computes
    # a query head width other than the value's (MLA) on its math path, which keeps the probabilities too, copies
    # the values out of the up-projection they are a view of (a fused kernel keeps that whole projection), and
    # computes in fp32.
    value_head = layer.value * layer.kv_groups // heads
    eager = attention == "eager"
    fused = not eager and (on_gpu or layer.query // heads == value_head)
    if fused:
        kept += (layer.query + layer.key + layer.value_storage) * values + 4 * heads
    else:
        repeat, inputs = (layer.kv_groups, values) if eager else (1, 4)
        score_bytes = 4 if not eager else values if layer.sinks else 4 + (values if values < 4 else 0)
        kept += (layer.query + repeat * (layer.key + layer.value)) * inputs
        kept += heads * (seq_len + layer.sinks) * score_bytes + 8 * heads * layer.sinks  # the sink softmax's max
    # A dense FFN (SwiGLU) keeps gate, up, activation and their product. Each of an MoE layer's top_k experts keeps
    # `gate_values` expert-wide values, its copy of the token and its output before weighting (a loop over the
    # experts also the weighted output, for `index_add_`; `batched_mm` a copy of the expert's weights per token);
    # the router its fp32 scores over the experts and int64 indices and the weight of each expert picked (and, in
    # 16-bit training, the fp32 copy of its input a router scoring in fp32 keeps); shared experts as a dense FFN,
    # and a sigmoid gate on them their output.
    kept += 4 * layer.dense * values
    if layer.experts:
        kernel = {"eager": hidden, "batched_mm": 3 * layer.expert_width * hidden}.get(layer.expert_kernel, 0)
        kept += layer.top_k * (layer.gate_values * layer.expert_width + 2 * hidden + kernel) * values
        kept += 4 * layer.experts + layer.top_k * (32 + values)
        kept += hidden * layer.router_copy_16bit if values < 4 else 0
    kept += (4 * layer.shared + (hidden + 1 if layer.shared_gate else 0)) * values
    return kept



def layer_bytes(config: PretrainedConfig, seq_len: int, value_bytes: int, on_gpu: bool = True) -> list[float]:
    """What autograd keeps of each decoder layer per token, in bytes: read off the model transformers builds
    (`model_size.model_shape`: dense or MoE layer, attention widths, MLA, query/key norms, shared experts, sinks,
    the attention kernel), counted per tensor kept. Checked against the saved tensors of a real forward
    (`saved_tensors_hooks`) for each architecture by tests/test_memory_archs.py."""
    shape = model_shape(config)
    return [_layer_bytes(layer, shape.attention, seq_len, value_bytes, on_gpu) for layer in shape.layers]



def layer_bytes_per_token(config: PretrainedConfig, seq_len: int, value_bytes: int, on_gpu: bool = True) -> float:
    """What autograd keeps of the costliest decoder layer per token (an MoE layer's more than a dense one's)."""
    return max(layer_bytes(config, seq_len, value_bytes, on_gpu))



def loss_bytes_per_token(config: PretrainedConfig, value_bytes: int) -> float:
    """The loss's peak per token, at the start of the backward: the logits (in the run's dtype), the fp32
    log-softmax the cross-entropy keeps (transformers' loss upcasts), and the fp32 gradients of both."""
    return config.vocab_size * (value_bytes + 3 * 4)



def _precision(train: TrainConfig, on_gpu: bool) -> str:
    return ("bf16-mixed" if on_gpu else "fp32") if train.precision == "auto" else train.precision



def local_rows(train: TrainConfig, num_devices: int) -> int:
    """Rows one forward pass holds on one device: a sharded stage gives each of its `num_devices` workers
    batch_size / num_devices rows, which it runs in micro-batches of micro_batch_size."""
    share = math.ceil(train.batch_size / num_devices)
    return min(train.micro_batch_size, share) if train.micro_batch_size else share



def splits_evenly(train: TrainConfig, num_devices: int) -> bool:
    """Whether `num_devices` workers can share `train`'s batch as `JobSpec` requires: the same rows each, in whole
    micro-batches (uneven shares hang FSDP2's collectives)."""
    if train.batch_size % num_devices:
        return False
    return not train.micro_batch_size or (train.batch_size // num_devices) % train.micro_batch_size == 0



def _activations_gb(config, train: TrainConfig, seq_len: int, value_bytes: int, rows: int,
                    on_gpu: bool = True) -> tuple[float, float]:
    """(what one micro-batch's forward keeps until its backward, the costliest layer's share of that), in GB.
    Checkpointing keeps each layer's input only and recomputes one layer at a time in the backward."""
    layers = layer_bytes(config, seq_len, value_bytes, on_gpu)
    kept = len(layers) * config.hidden_size * value_bytes if train.activation_checkpointing else sum(layers)
    tokens = rows * seq_len
    return tokens * (kept + loss_bytes_per_token(config, value_bytes)) / GB, tokens * max(layers) / GB



def memory_plan(params: int, config: PretrainedConfig, train: TrainConfig, seq_len: int, device_gb: float,
                on_gpu: bool = True, num_devices: int = 1) -> dict:
    """GB per device of training `params` parameters with `train`'s memory measures as set: the peak of the step's
    three phases over what lives through all of them (weights and optimizer state).

    Weights: 4 bytes (2 in bf16-true, plus its 2-byte compensation buffer); gradients as the weights; AdamW
    moments 8 bytes (4 as bf16 in bf16-true, 2 with the 8-bit optimizer; 0 on a GPU with them offloaded to host
    memory). Sharded over `num_devices`, each holds its share of these. The phases:
      - forward end: the activations of one micro-batch of this device's rows (`local_rows`; values in 4 bytes
        for fp32, 2 otherwise), and the gradients of the earlier micro-batches when there are several;
      - backward: the gradients, and the activations of the layer being differentiated;
      - optimizer step: the gradients, and the step's working set (`optimizer_step_gb`).
    Checked against measured peaks by `benchmarks/memory.py`.
    """
    precision = _precision(train, on_gpu)
    true_bf16 = precision == "bf16-true"
    weight_bytes = 2 if true_bf16 else 4
    state_bytes = 2 if train.optimizer == "adamw-8bit" else (4 if true_bf16 else 8)
    if train.offload_optimizer and on_gpu:
        state_bytes = 0
    value_bytes = 4 if precision == "fp32" else 2
    shard = params / num_devices / GB
    rows = local_rows(train, num_devices)
    activations, layer = _activations_gb(config, train, seq_len, value_bytes, rows, on_gpu)
    if precision == "bf16-mixed":  # autocast keeps the bf16 copy of every weight a matmul used for its backward
        activations += 2 * params / GB
    if num_devices > 1:  # FSDP2 gathers a unit's whole weights to run it, and prefetches the next one's
        activations += 2 * weight_bytes * largest_tensor(config) / GB
    gradients = shard * weight_bytes
    # `StoredAdamW` (bf16-true, offload) steps one parameter at a time in fp32: weight, gradient and both moments of
    # the largest one are alive at once, 16 bytes per value. torch's AdamW makes one fp32 temporary per parameter on
    # the CPU, and on a GPU (its `foreach` path) one spanning every parameter at once.
    stored, torch_adamw = true_bf16 or train.offload_optimizer, train.optimizer == "adamw"
    step_gb = 4 * shard if on_gpu and torch_adamw and not stored else \
        (16 if stored else 4 * torch_adamw) * largest_tensor(config) / num_devices / GB
    micro_batches = math.ceil(train.batch_size / num_devices) // rows
    plan = {
        "weights_gb": shard * (weight_bytes + (2 if true_bf16 else 0)), "gradients_gb": gradients,
        "optimizer_gb": shard * state_bytes, "activations_gb": activations, "optimizer_step_gb": step_gb,
    }
    phases = {"forward": activations + (gradients if micro_batches > 1 else 0.0), "backward": gradients + layer,
              "step": gradients + plan["optimizer_step_gb"]}
    plan["peak_phase"] = max(phases, key=phases.get)
    plan["total_gb"] = plan["weights_gb"] + plan["optimizer_gb"] + phases[plan["peak_phase"]]
    plan.update(device_gb=device_gb, num_devices=num_devices, fits=plan["total_gb"] <= device_gb * FILL,
                measures=measures_of(train))
    return plan



class MemoryFitError(SpecError):
    """Stages that do not fit their tier: a training stage that fits no device with any measure, or `source`,
    whose model does not fit one node's host memory; `problems` names, per TrainConfig section or stage, the
    device or node and the shortfall in GB."""

    def __init__(self, problems: dict[str, str]):
        super().__init__("the job does not fit its tiers: " + "; ".join(problems.values()))
        self.problems = problems



def _largest_micro_batch(params, config, train, seq_len, device_gb, on_gpu, num_devices) -> TrainConfig:
    """`train` with the largest micro-batch (a divisor of each device's batch_size / num_devices rows) that fits,
    else 1."""
    if "micro_batch_size" in train.model_fields_set:
        return train
    rows = train.batch_size // num_devices
    for size in [size for size in range(rows, 0, -1) if rows % size == 0]:
        candidate = train.model_copy(update={"micro_batch_size": None if size == rows else size})
        if memory_plan(params, config, candidate, seq_len, device_gb, on_gpu, num_devices)["fits"]:
            return candidate
    return train.model_copy(update={"micro_batch_size": 1})



def _climb(params, config, train, seq_len, device_gb, on_gpu, num_devices) -> tuple[TrainConfig, dict]:
    """The cheapest rung of `LADDER` (with the largest micro-batch that fits) on `num_devices`, else the top one."""
    steps = [(name, value) for name, value in LADDER if name not in train.model_fields_set]
    for index in range(len(steps) + 1):
        candidate = train.model_copy(update=dict(steps[:index]))
        candidate = _largest_micro_batch(params, config, candidate, seq_len, device_gb, on_gpu, num_devices)
        plan = memory_plan(params, config, candidate, seq_len, device_gb, on_gpu, num_devices)
        if plan["fits"]:
            break
    return candidate, plan



def plan_measures(params: int, config: PretrainedConfig, train: TrainConfig, seq_len: int, device_gb: float,
                  on_gpu: bool, num_devices: int = 1) -> tuple[TrainConfig, dict]:
    """The cheapest measures, up `LADDER` on the `num_devices` the stage trains on, then sharding over more, that
    fit `device_gb` per device; fields the user set stay as set. Returns the resolved `TrainConfig` and its plan,
    whose `num_devices` is the devices the plan needs: more than `num_devices` when only sharding fits, the
    fewest that fit and split the batch evenly (`splits_evenly`), as a sharded run must."""
    candidate, plan = _climb(params, config, train, seq_len, device_gb, on_gpu, num_devices)
    if plan["fits"]:
        return candidate, plan
    for devices in range(num_devices + 1, train.batch_size + 1):
        if not splits_evenly(train, devices):
            continue
        sharded, sharded_plan = _climb(params, config, train, seq_len, device_gb, on_gpu, devices)
        if sharded_plan["fits"]:
            return sharded, sharded_plan
    return candidate, plan



def stage_devices(spec: JobSpec, section: str, sharded: bool) -> tuple[int, str]:
    """The devices a training section's stage trains on under its runner, and where that number comes from. The
    local runner trains every stage in one process on one device: it never shards. The Ray runner shards a
    cheap-tier trainer (the submodels, the shared warm-up) over `resources.workers_per_expert` workers and the
    fine-tune or the full-parameter baseline over its tier's `num_devices` (`ray_cluster.trainers.num_workers`)."""
    if not sharded:
        return 1, "the local runner"
    if section == "submodel":
        return spec.resources.workers_per_expert, "resources.workers_per_expert"
    return spec.resources.finetune_tier.num_devices, "resources.finetune_tier.num_devices"



def _training_stages(spec: JobSpec, config: PretrainedConfig, counts: dict) -> list[tuple]:
    """(TrainConfig section, parameters, model config, tier) of each training stage the job runs, in plan order."""
    moe_warmup = spec.branch.warmup_steps > 0 and spec.branch.warmup_model == "moe"  # the whole MoE, cheap tier
    submodel = ((counts["total"], config) if moe_warmup
                else (counts["submodel"], with_num_experts(config, submodel_group(spec))))
    sizes = {"submodel": submodel, "finetune": (counts["total"], config), "full_parameter": (counts["total"], config)}
    trained = {STAGE[task.stage].train_config: task.stage for group in plan(spec) for task in group
               if STAGE[task.stage].trained}  # the warm-up and the submodels share one section
    return [(section, *sizes[section], tier_of(spec.resources, stage)) for section, stage in trained.items()]



def memory_plans(spec: JobSpec, config: PretrainedConfig | None = None, counts: dict | None = None,
                 sharded: bool = True) -> dict[str, tuple[TrainConfig, dict, TierConfig]]:
    """Per training section, the `TrainConfig` it will train with (resolved by the planner under `memory: auto`),
    its plan on its tier's device, and the tier. `sharded`: planned for the Ray runner, which shards a stage over
    its workers, else for the local one (`stage_devices`); each plan says which in `devices_from`. A tier whose
    `device_type` has no `devices` entry (memory unknown, e.g. a `cpu` tier) is not planned."""
    config = config or spec_config(spec)
    counts = counts or spec_counts(spec, config)
    plans = {}
    for section, params, model_config, tier in _training_stages(spec, config, counts):
        device = spec.resources.devices.get(tier.device_type)
        if device is None:
            continue
        devices, devices_from = stage_devices(spec, section, sharded)
        train, args = getattr(spec, section), (spec.data.sequence_length, device.memory_gb,
                                               tier.device_type != CPU_DEVICE_TYPE, devices)
        resolved, plan = (plan_measures(params, model_config, train, *args) if train.memory == "auto"
                          else (train, memory_plan(params, model_config, train, *args)))
        plan.update(available_devices=devices, devices_from=devices_from)
        plans[section] = (resolved, plan, tier)
    return plans



def refusal(section: str, tier: TierConfig, plan: dict) -> str | None:
    device = f"{tier.device_type} ({plan['device_gb']:g} GB, {FILL:.0%} usable)"
    if not plan["fits"]:
        short = plan["total_gb"] - plan["device_gb"] * FILL
        return (f"{section}: needs {plan['total_gb']:.1f} GB per device with {plan['measures']} on "
                f"{plan['num_devices']} x {device}: {short:.1f} GB short")
    if plan["num_devices"] > plan["available_devices"]:
        source, needed = plan["devices_from"], plan["num_devices"]
        fix = ("the local runner never shards: run it on Ray" if source == "the local runner"
               else f"set {source} to {needed}")
        return (f"{section}: fits {device} only sharded over {needed} devices ({plan['total_gb']:.3g} GB each), "
                f"but it trains on {plan['available_devices']} ({fix})")
    return None



def _started_run(paths: JobPaths, section: str) -> Path | None:
    """The run folder a training section's stage has already written to (checkpoints, weights), if any."""
    runs = [paths.run("warmup"), *(sorted(paths.submodels.iterdir()) if paths.submodels.is_dir() else [])] \
        if section == "submodel" else [paths.run(section)]
    return next((run for run in runs if run.is_dir() and any(run.iterdir())), None)



def keep_checkpointed_measures(spec: JobSpec) -> tuple[JobSpec, dict[str, Path]]:
    """A resumed job's spec with the checkpointed measures of every stage that already trained taken from the job
    folder's saved spec, as if the user had set them: re-planned for other devices, a precision or optimizer
    change would not load the stage's checkpoints (or would mix formats across submodels). Returns the spec and,
    per section kept, the run folder it was kept for."""
    paths = JobPaths(spec.output_dir)
    if not paths.spec.is_file():
        return spec, {}
    saved, update, kept = yaml.safe_load(paths.spec.read_text()) or {}, {}, {}
    for section in ("submodel", "finetune", "full_parameter"):
        train, run = getattr(spec, section), _started_run(paths, section)
        if run is None or train.memory != "auto" or section not in saved:
            continue
        pinned = {k: saved[section][k] for k in CHECKPOINTED_MEASURES
                  if k in saved[section] and k not in train.model_fields_set}
        update[section], kept[section] = train.model_copy(update=pinned), run
    return spec.model_copy(update=update), kept



def resolve_memory(spec: JobSpec, sharded: bool = True) -> JobSpec:
    """The spec with each training section's memory measures as the planner resolves them for the runner
    (`sharded`: the Ray runner; False: the local one) (the spec a job saves and runs); raises `MemoryFitError`
    naming the stage, the device and the shortfall when one fits no device, and `source` when its model does not
    fit one node of its tier (`host_plans`) and it has not run yet. A resumed job keeps the checkpointed
    measures of the stages that already trained (`keep_checkpointed_measures`), and is refused, naming their
    run folder, when those no longer fit."""
    if spec.method == "retire":  # nothing trains and no source is built
        return spec
    spec, kept = keep_checkpointed_measures(spec)
    plans = memory_plans(spec, sharded=sharded)
    problems = {section: problem for section, (_, plan, tier) in plans.items()
                if (problem := refusal(section, tier, plan))}
    for section in problems.keys() & kept.keys():
        problems[section] += (f" (its {', '.join(CHECKPOINTED_MEASURES)} are kept from the checkpoints in "
                              f"{kept[section]}, which a resumed stage must load; start over in a new output_dir "
                              "to re-plan them)")
    paths = JobPaths(spec.output_dir)  # a stage already done (a resumed job) needs no memory any more
    problems.update({stage: problem for stage, host in host_plans(spec).items()
                     if not is_done(paths, stage) and (problem := host_refusal(stage, host))})
    if problems:
        raise MemoryFitError(problems)
    return spec.model_copy(update={section: train for section, (train, _, _) in plans.items()})

