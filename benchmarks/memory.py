"""Estimate vs measured peak memory of each memory measure, and a CPU job that fits a device through `memory: auto`.

    python benchmarks/memory.py [--quick]      # rows: hidden 512 / 1024 / 2048 (--quick: 512) x measure
    python benchmarks/memory.py --auto-job     # a hidden-1024 job on a tier given 40% of the plain estimate

Rows: a submodel (shared + one expert, 4 layers, vocab 8192) trained by moedisco's own loop (`train.train`) for a
few steps in a fresh process per row, with no measure (plain fp32), each measure alone, and the plan `memory: auto`
resolves for a device of 60% of the plain estimate. Measured: the stage's own meter (`memory.PeakMemory`: resident
high-water mark above the level before the model was built), after a warm-up step of a minimal model with the same
measures, so that the runtime's one-time costs (libraries loaded on first use, thread pools) are not charged to the
model. Estimated: `moedisco.planning.memory_plan.memory_plan` (CPU: activations in 4 bytes, except bf16-true). Offload is a no-op on
the CPU and has no row. Targets: estimate within 15% of measured in every row; tokens/s of each measure as a ratio
to plain.

--auto-job: the whole pipeline on the bundled corpus at hidden 1024 with both tiers `cpu` and the `cpu` device
given 40% of the plain submodel estimate: every training stage's recorded peak must be at or below it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _common import REPO, run_child, sized_config

SEQ_LEN, BATCH, LAYERS = 128, 8, 4
MEASURES = {"plain": {}, "micro_batch": {"micro_batch_size": 1}, "checkpointing": {"activation_checkpointing": True},
            "bf16_true": {"precision": "bf16-true"}, "adamw_8bit": {"optimizer": "adamw-8bit"}}
AUTO_DEVICE_SHARE = 0.6  # the auto row's device: this share of the plain estimate
JOB_DEVICE_SHARE = 0.4  # --auto-job: the tier's device memory, as a share of the plain estimate


def _config(hidden: int, vocab: int = 8192):
    from moedisco.models.architecture import with_num_experts

    return with_num_experts(sized_config(hidden, num_experts=4, layers=LAYERS, vocab=vocab), 1)


def _train(config, measures: dict, steps: int, run_dir: Path, meter=None):
    import torch
    from transformers import AutoModelForCausalLM

    from moedisco.config.spec import TrainConfig
    from moedisco.job.metrics import MetricsWriter
    from moedisco.training.loop import TrainContext, train

    cfg = TrainConfig(**{"steps": steps, "batch_size": BATCH, "device": "cpu", "precision": "fp32",
                         "eval_every": steps, "checkpoint_every": steps, **measures})
    seqs = torch.randint(0, config.vocab_size, (4 * BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_config(config)
    context = TrainContext(run_dir, stage="submodel", seed=0, metrics=MetricsWriter(run_dir / "m.jsonl"),
                           progress=False, meter=meter)
    return model, cfg, train(model, seqs, None, cfg, context)


def child(payload: dict) -> dict:
    import torch

    from moedisco.planning.memory_plan import memory_plan
    from moedisco.training.memory import PeakMemory

    torch.set_num_threads(2)
    measures, config = payload["measures"], _config(payload["hidden"])
    with tempfile.TemporaryDirectory() as tmp:
        _train(_config(64, vocab=256), measures, 1, Path(tmp) / "warmup")
        meter = PeakMemory(torch.device("cpu"))
        model, cfg, result = _train(config, measures, payload["steps"], Path(tmp) / "run", meter)
        peak_gb = meter.peak_gb()
    params = sum(p.numel() for p in model.parameters())
    plan = memory_plan(params, config, cfg, SEQ_LEN, 1e9, on_gpu=False)
    return {"params": params, "peak_gb": peak_gb, "estimate_gb": plan["total_gb"],
            "tokens_per_s": result.tokens / result.seconds}


def _auto_measures(hidden: int, share: float = AUTO_DEVICE_SHARE) -> dict:
    from moedisco.config.spec import TrainConfig
    from moedisco.planning.memory_plan import memory_plan, plan_measures
    from moedisco.planning.model_size import parameter_counts

    config = _config(hidden)
    params = parameter_counts(config)["total"]
    plain = TrainConfig(batch_size=BATCH, precision="fp32")
    device_gb = share * memory_plan(params, config, plain, SEQ_LEN, 1e9, on_gpu=False)["total_gb"]
    resolved, plan = plan_measures(params, config, TrainConfig(batch_size=BATCH), SEQ_LEN, device_gb, on_gpu=False)
    if plan["num_devices"] > 1:  # the row trains in one process: a plan that needs sharding has no row
        raise SystemExit(f"hidden {hidden}: no measure fits {device_gb:.2f} GB on one device "
                         f"(the plan shards over {plan['num_devices']})")
    return {k: v for k, v in resolved.model_dump().items() if k in resolved.model_fields_set - {"batch_size"}}


def rows(sizes: list[int], on_row=lambda table: None, only: list[str] | None = None,
         auto_share: float = AUTO_DEVICE_SHARE) -> list[dict]:
    """The rows of every size (`only`: of these measures); `on_row(rows so far)` after each (a long run leaves
    what it measured). Speeds are against plain, when plain is among the rows."""
    out = []
    for hidden in sizes:
        steps = 3 if hidden < 2048 else 2
        plain_speed = None
        for name in only or [*MEASURES, "auto"]:
            measures = _auto_measures(hidden, auto_share) if name == "auto" else MEASURES[name]
            row = run_child(__file__, {"hidden": hidden, "measures": measures, "steps": steps})
            plain_speed = plain_speed or (row["tokens_per_s"] if name == "plain" else None)
            out.append({"hidden": hidden, "measure": name, **row, "error": row["estimate_gb"] / row["peak_gb"] - 1,
                        "speed_vs_plain": row["tokens_per_s"] / plain_speed if plain_speed else None,
                        **({"measures": measures, "device_share": auto_share} if name == "auto" else {})})
            on_row(out)
    return out


def _table(table: list[dict]) -> dict:
    return {"benchmark": "memory", "device": "cpu", "seq_len": SEQ_LEN, "batch": BATCH, "layers": LAYERS,
            "rows": table, "max_abs_error": max(abs(r["error"]) for r in table)}


def auto_job(out_dir: Path) -> dict:
    from moedisco.config.loading import build_spec
    from moedisco.config.spec import TrainConfig
    from moedisco.job.layout import JobPaths
    from moedisco.job.metrics import read_metrics
    from moedisco.models.architecture import with_num_experts
    from moedisco.planning.memory_plan import memory_plan
    from moedisco.planning.model_size import parameter_counts, spec_config
    from moedisco.runner.job_runner import run_job
    from tests.conftest import tiny_spec_dict

    hidden = 1024
    model = {"hidden_size": hidden, "intermediate_size": 4 * hidden, "moe_intermediate_size": hidden // 2,
             "shared_expert_intermediate_size": hidden, "num_hidden_layers": LAYERS, "num_attention_heads": 16,
             "num_key_value_heads": 16, "num_experts": 2, "num_experts_per_tok": 1, "max_position_embeddings": 1024}
    train = {"steps": 2, "batch_size": 16, "eval_every": 2, "eval_batches": 1, "checkpoint_every": 2}
    cpu = {"label": "cpu", "device_type": "cpu"}
    raw = tiny_spec_dict(out_dir, model=model, submodel=train, finetune=train, branch={"sync_rounds": 1},
                         data={"sequence_length": SEQ_LEN, "max_documents": 240}, tokenizer={"vocab_size": 4096},
                         merge={"weighting": "fisher"},
                         resources={"submodel_tier": cpu, "finetune_tier": cpu})
    spec = build_spec(raw)
    config = spec_config(spec)
    plain = memory_plan(parameter_counts(config)["submodel"], with_num_experts(config, 1),
                        TrainConfig(batch_size=16, precision="fp32"), SEQ_LEN, 1e9, on_gpu=False)["total_gb"]
    raw["resources"]["devices"] = {"cpu": {"memory_gb": JOB_DEVICE_SHARE * plain, "bf16_tflops": 1.0}}
    spec = build_spec(raw)
    run_job(spec, progress=False)
    paths = JobPaths(spec.output_dir)
    stages = [json.loads(path.read_text()) for path in sorted(paths.markers.glob("*.json"))]
    trained = [s for s in stages if "peak_memory_gb" in s]
    peaks = {f"{r['stage']}{'' if r.get('expert') is None else r['expert']}": r["peak_memory_gb"]
             for r in read_metrics(paths.metrics) if "peak_memory_gb" in r}
    device_gb = JOB_DEVICE_SHARE * plain
    return {"benchmark": "memory_auto_job", "hidden": hidden, "plain_estimate_gb": plain, "device_gb": device_gb,
            "stages": [{"peak_memory_gb": s["peak_memory_gb"], "measures": s["memory_measures"],
                        "expert": s.get("expert")} for s in trained],
            "last_logged_peaks_gb": peaks, "all_at_or_below_device": all(s["peak_memory_gb"] <= device_gb
                                                                           for s in trained)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="hidden 512 only")
    parser.add_argument("--auto-job", action="store_true", help="the CPU job under `memory: auto`")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048], help="hidden sizes of the rows")
    parser.add_argument("--out", type=Path, help="also write the rows measured so far here, after each row")
    parser.add_argument("--only", nargs="+", choices=[*MEASURES, "auto"], help="only these rows of each size")
    parser.add_argument("--auto-share", type=float, default=AUTO_DEVICE_SHARE,
                        help="the auto row's device memory, as a share of the plain estimate")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    if args.auto_job:
        with tempfile.TemporaryDirectory(dir=REPO / "runs") as tmp:
            result = auto_job(Path(tmp) / "out")
    else:
        save = (lambda table: args.out.write_text(json.dumps(_table(table), indent=1))) if args.out else None
        result = _table(rows([512] if args.quick else args.sizes, save or (lambda table: None), args.only,
                             args.auto_share))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
