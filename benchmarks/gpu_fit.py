"""The paper's setting on the paper's cards: a Qwen1.5-MoE-A2.7B x 4 submodel within 24 GB, the full MoE within 80 GB.

    python benchmarks/gpu_fit.py            # CUDA: 20 steps each, random init, random token ids, seq 1024, batch 16
    python benchmarks/gpu_fit.py --tiny     # the same script at a tiny size on the CPU (no cap), to check it runs

Each stage trains with the measures `memory: auto` resolves for its device (`moedisco.planning.memory_plan.plan_measures`), in
moedisco's own loop (`train.train`), with `torch.cuda.set_per_process_memory_fraction` capping the process at the
device's memory, so an allocation beyond it fails as it would on the real card. Prints, per stage, the measures,
the estimate, the peak (`torch.cuda.max_memory_allocated`), tokens/s and MFU (6 x parameters x tokens/s over the
device's dense bf16 peak, `--peak-tflops`; the submodel trains all its parameters, the full MoE's are counted as
active ones).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _common import REPO

sys.path.insert(0, str(REPO))


def stage(name: str, train_config, config, params: int, active: int, cap_gb: float, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from moedisco.job.metrics import MetricsWriter
    from moedisco.planning.memory_plan import plan_measures
    from moedisco.training.loop import TrainContext, train
    from moedisco.training.memory import PeakMemory, measures_of, weight_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The example's section (precision bf16-true, the paper's "Data Type bf16"), for this run's steps and device.
    base = train_config.model_copy(update={"steps": args.steps, "batch_size": args.batch, "eval_every": args.steps,
                                           "checkpoint_every": args.steps, "device": device.type})
    cfg, plan = plan_measures(params, config, base, args.seq, cap_gb, on_gpu=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 1e9 / torch.cuda.get_device_properties(
            device).total_memory), device)
    meter = PeakMemory(device)
    model = AutoModelForCausalLM.from_config(config, dtype=weight_dtype(cfg))
    ids_NL = torch.randint(0, config.vocab_size, (args.batch * 2, args.seq), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        context = TrainContext(Path(tmp), stage="submodel", seed=0, metrics=MetricsWriter(Path(tmp) / "m.jsonl"),
                               progress=False, meter=meter)
        result = train(model, ids_NL, None, cfg, context)
    tokens_per_s = result.tokens / result.seconds
    return {"stage": name, "cap_gb": cap_gb, "measures": measures_of(cfg), "num_devices": plan["num_devices"],
            "estimate_gb": plan["total_gb"], "peak_memory_gb": meter.peak_gb(), "tokens_per_s": tokens_per_s,
            "mfu": 6 * active * tokens_per_s / (args.peak_tflops * 1e12), "parameters": params}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200: 989)")
    args = parser.parse_args()
    from moedisco.config.loading import load_spec
    from moedisco.models.architecture import with_num_experts
    from moedisco.planning.model_size import parameter_counts, spec_config

    overrides = ["model.hidden_size=64", "model.intermediate_size=128", "model.moe_intermediate_size=64",
                 "model.shared_expert_intermediate_size=64", "model.num_hidden_layers=2",
                 "model.num_attention_heads=4", "model.num_key_value_heads=4", "tokenizer.vocab_size=512"]
    spec = load_spec(REPO / "examples" / "qwen1.5-moe-a2.7b.yaml", overrides if args.tiny else [])
    args.seq, args.batch = (64, 4) if args.tiny else (1024, 16)
    args.steps = 3 if args.tiny else args.steps
    config = spec_config(spec)
    counts = parameter_counts(config)
    caps = (0.01, 0.02) if args.tiny else (24.0, 80.0)
    rows = [stage("submodel", spec.submodel, with_num_experts(config, 1), counts["submodel"], counts["submodel"],
                  caps[0], args),
            stage("full_moe", spec.finetune, config, counts["total"], counts["active"], caps[1], args)]
    result = {"benchmark": "gpu_fit", "tiny": args.tiny, "seq_len": args.seq, "batch": args.batch,
              "steps": args.steps, "rows": rows}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
