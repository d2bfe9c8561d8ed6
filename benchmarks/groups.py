"""Fine-grained experts trained in groups (`model.experts_per_submodel`) against one expert per submodel (issue 32).

    python benchmarks/groups.py --out benchmarks/results_groups.json     # about 15 minutes on 2 CPU cores
    python benchmarks/groups.py --quick                                  # a minute: the plumbing only

One MoE of E small experts (default 8, top-2; `--arch`), MoE-DisCo on the bundled corpus with every group size g of
`--groups`: E/g submodels of g experts each on E/g k-means clusters. The cheap phase trains the same tokens whatever
g is (each submodel `--submodel-steps` x g steps: fewer, larger clusters get as many tokens in all), and the fine-tune
is the same. Prints per g: the held-out loss per domain and overall after the merge and after the fine-tune, the
oracle loss at the merge (each cluster's documents to its group), the FLOP model's dollars per phase and this
machine's wall seconds.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import add_job_arguments, publish
from extend import domain_sequences, split_corpus

from moedisco.config.loading import apply_overrides, build_spec
from moedisco.job.layout import JobPaths, stage_result
from moedisco.planning.estimate import flop_cost
from moedisco.planning.model_size import parameter_counts, spec_config
from moedisco.runner.job_runner import run_job
from moedisco.stages.domains import domain_losses
from moedisco.stages.prepare import load_tokenizer


def job_spec(args, group: int, tokenizer: Path | None) -> dict:
    folder = args.work / "data"
    steps = args.submodel_steps * group
    return {
        "name": f"g{group}", "output_dir": str(args.work / f"{args.arch}_g{group}"), "seed": args.seed,
        "data": {"train": str(folder / "all_train.jsonl"), "eval": str(folder / "all_eval.jsonl"),
                 "sequence_length": 128},
        "tokenizer": {"path": str(tokenizer), "vocab_size": 2048} if tokenizer else {"vocab_size": 2048},
        "model": {"arch": args.arch, "num_experts": args.experts, "num_experts_per_tok": 2,
                  "experts_per_submodel": group, "hidden_size": 64, "intermediate_size": 128,
                  "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512},
        "branch": {"warmup_steps": args.warmup, "warmup_model": "moe"},
        "submodel": {"steps": steps, "batch_size": 4, "lr": 1e-3, "eval_every": steps,
                     "checkpoint_every": max(1, steps // 2)},
        "finetune": {"steps": args.finetune_steps, "batch_size": 8, "lr": 1e-3, "eval_every": args.finetune_steps,
                     "checkpoint_every": args.finetune_steps},
    }


def run(args, group: int, tokenizer: Path | None):
    spec = build_spec(apply_overrides(job_spec(args, group, tokenizer), args.set))
    started = time.perf_counter()
    summary = run_job(spec, progress=False)
    return spec, summary, time.perf_counter() - started


def measure(spec, summary: dict, seconds: float, domains) -> dict:
    paths = JobPaths(spec.output_dir)
    merge = stage_result(paths, "merge")
    flop = flop_cost(spec, parameter_counts(spec_config(spec), spec.model.experts_per_submodel), {})
    merged, final = domain_losses(paths.merged, domains), domain_losses(paths.root / "final", domains)
    tokens = sum(d.sequences.numel() for d in domains)
    overall = lambda losses: sum(losses[d.name] * d.sequences.numel() for d in domains) / tokens  # noqa: E731
    return {"submodels": spec.num_clusters, "submodel_steps": spec.submodel.steps,
            "merged": {**merged, "overall": overall(merged)}, "final": {**final, "overall": overall(final)},
            "oracle_at_merge": merge["oracle_eval_loss"], "merge_eval_loss": merge["eval_loss"],
            "flop_usd": {"submodels": flop["submodels_usd"], "warmup": flop["warmup_usd"],
                         "finetune": flop["finetune_usd"], "total": flop["total_usd"]},
            "ledger_usd": summary["cost"]["total_usd"], "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/moedisco_groups_bench"))
    parser.add_argument("--arch", default="qwen3_moe")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--submodel-steps", type=int, default=150, help="per submodel of one expert (x g for g)")
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=30, help="shared warm-up steps of the whole MoE")
    add_job_arguments(parser, "merge.router_init=concat")
    args = parser.parse_args()
    if args.quick:
        args.submodel_steps, args.finetune_steps, args.warmup = 4, 4, 2
    held_out = split_corpus(args.work / "data", new_domain="none")
    runs, tokenizer = {}, None
    for group in args.groups:  # the first job trains the tokenizer every later one uses, so losses compare
        runs[group] = run(args, group, tokenizer)
        tokenizer = tokenizer or JobPaths(runs[group][0].output_dir).tokenizer
    domains = domain_sequences(held_out, load_tokenizer(tokenizer), 128)
    results = {f"g{group}": measure(*runs[group], domains) for group in args.groups}
    publish({"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
             "results": results}, args.out)


if __name__ == "__main__":
    main()
