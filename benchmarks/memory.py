"""Peak training memory of a submodel vs the full MoE, next to the parameter bound and `moedisco estimate`.

    python benchmarks/memory.py [--quick]

Each measurement trains a few AdamW steps in its own process (CPU: peak resident memory above the process's
baseline; GPU: torch.cuda.max_memory_allocated). The baseline is taken after one training step of a minimal model
of the same architecture, so the runtime's one-time costs (kernels and libraries loaded on first use, thread pools,
allocator arenas: ~37 MB here, whatever the model) are reported apart, as `runtime_mb`, not charged to the model.
The parameter bound for the ratio is (shared + one expert) / (shared + all experts); the estimate is
moedisco.estimate.memory_plan for the same batch.
Targets: measured ratio within 5% of the bound; estimate within 20% of measured.
"""

from __future__ import annotations

import gc
import json

from _common import bench_args, peak_rss_mb, reset_peak_rss, run_child, sized_config

SEQ_LEN, BATCH, STEPS = 64, 2, 3  # small activations: the state memory the bound speaks of dominates


def child(payload: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from moedisco.config import TrainConfig
    from moedisco.estimate import memory_plan
    from moedisco.split import with_num_experts

    torch.set_num_threads(2)
    config = sized_config(payload["hidden"], num_experts=payload["experts"])
    if payload["which"] == "submodel":
        config = with_num_experts(config, 1)
    start = reset_peak_rss()
    train_steps(AutoModelForCausalLM.from_config(sized_config(64, num_experts=payload["experts"], vocab=256)), 1)
    gc.collect()
    before = reset_peak_rss()
    model = AutoModelForCausalLM.from_config(config)
    train_steps(model, STEPS)
    params = sum(p.numel() for p in model.parameters())
    plan = memory_plan(params, config, TrainConfig(batch_size=BATCH, dtype="fp32"), SEQ_LEN, 24.0, on_gpu=False)
    return {"params": params, "peak_mb": peak_rss_mb() - before, "runtime_mb": before - start,
            "estimate_mb": plan["total_gb"] * 1000}


def train_steps(model, steps: int) -> None:
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ_LEN))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def main(argv=None) -> dict:
    args = bench_args(__doc__, child, argv)
    if args is None:
        return {}
    sizes = [256, 512] if args.quick else [256, 512, 1024]
    rows = []
    for hidden in sizes:
        full = run_child(__file__, {"hidden": hidden, "experts": 4, "which": "full"})
        sub = run_child(__file__, {"hidden": hidden, "experts": 4, "which": "submodel"})
        bound = sub["params"] / full["params"]
        measured = sub["peak_mb"] / full["peak_mb"]
        rows.append({"hidden": hidden, "full": full, "submodel": sub, "param_bound_ratio": bound,
                     "measured_ratio": measured, "ratio_error": measured / bound - 1,
                     "estimate_error_full": full["estimate_mb"] / full["peak_mb"] - 1,
                     "estimate_error_submodel": sub["estimate_mb"] / sub["peak_mb"] - 1})
    result = {"benchmark": "memory", "device": "cpu", "seq_len": SEQ_LEN, "batch": BATCH, "rows": rows}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
