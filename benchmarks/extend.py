"""Growing a trained MoE for a new domain against training it again from scratch (issue 31).

    python benchmarks/extend.py --out benchmarks/results_extend.json            # about 30 minutes on 2 CPU cores
    python benchmarks/extend.py --quick                                          # a few minutes: the plumbing only

On the bundled corpus (4 domains) with one domain held back (`--new-domain`, default code), every domain's documents
split into train and held-out alike:
  * scratch: a 5-expert MoE-DisCo job on all four domains;
  * base: a 4-expert job on the other three; extension: `method: extend` adds one expert for the held-back domain;
  * retired: `method: retire` removes that expert again.
Scratch trains as many tokens as base and extension together (its submodel steps and fine-tune are sized so), and
every job uses the same tokenizer (trained by the scratch job on all four domains), so per-token losses compare.
Prints, per model, the held-out loss on each domain's documents, and per job its cost: the ledger's dollars (this
machine's seconds at each tier's price) and the FLOP model's (`moedisco.planning.estimate.flop_cost`). Targets: the
new domain within 0.05 nats of scratch, the old domains within 0.02 of the base, the extension at <= 30% of the
scratch job's cost, and retiring the new expert giving back the base's old-domain losses within 0.01.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import REPO, add_job_arguments, publish

from moedisco.config.loading import apply_overrides, build_spec
from moedisco.planning.estimate import flop_cost
from moedisco.planning.model_size import parameter_counts, spec_config
from moedisco.runner.job_runner import run_job
from moedisco.stages.domains import Domain, domain_losses
from moedisco.stages.prepare import load_tokenizer

CORPUS = REPO / "examples" / "data" / "corpus.jsonl"
HELD_OUT_EVERY = 12  # every 12th document of each domain is held out (8%)


def split_corpus(folder: Path, new_domain: str) -> dict[str, list[dict]]:
    """Train and held-out files per group (old domains, new domain, all); returns the held-out documents by domain."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]
    seen: dict[str, int] = {}
    files = {name: {"train": [], "eval": []} for name in ("old", "new", "all")}
    held_out: dict[str, list[dict]] = {}
    for row in rows:
        index = seen[row["domain"]] = seen.get(row["domain"], -1) + 1
        part = "eval" if index % HELD_OUT_EVERY == 0 else "train"
        group = "new" if row["domain"] == new_domain else "old"
        for name in (group, "all"):
            files[name][part].append(row)
        if part == "eval":
            held_out.setdefault(row["domain"], []).append(row)
    for name, parts in files.items():
        for part, docs in parts.items():
            (folder / f"{name}_{part}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    return held_out


def domain_sequences(held_out: dict[str, list[dict]], tokenizer, seq_len: int) -> list[Domain]:
    """Each domain's held-out documents tokenized with the shared tokenizer, end to end, cut into sequences."""
    import torch

    domains = []
    for name, docs in sorted(held_out.items()):
        ids = [token for doc in docs for token in tokenizer(doc["text"])["input_ids"] + [tokenizer.eos_token_id]]
        count = len(ids) // seq_len
        domains.append(Domain(name, "held-out", torch.tensor(ids[: count * seq_len]).view(count, seq_len)))
    return domains


def job_spec(args, name: str, data: str, experts: int, submodel_steps: int, finetune_steps: int, **extra) -> dict:
    folder = args.work / "data"
    raw = {
        "name": name, "output_dir": str(args.work / name), "seed": args.seed,
        "data": {"train": str(folder / f"{data}_train.jsonl"), "eval": str(folder / f"{data}_eval.jsonl"),
                 "sequence_length": 128},
        "tokenizer": {"vocab_size": 2048},
        "model": {"arch": "qwen2_moe", "num_experts": experts, "num_experts_per_tok": 2, "hidden_size": 64,
                  "intermediate_size": 128, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "max_position_embeddings": 512},
        "branch": {"warmup_steps": args.warmup},
        "submodel": {"steps": submodel_steps, "batch_size": 2, "lr": 1e-3, "eval_every": max(1, submodel_steps),
                     "checkpoint_every": max(1, submodel_steps // 4)},
        "finetune": {"steps": finetune_steps, "batch_size": 8, "lr": 1e-3, "eval_every": max(1, finetune_steps),
                     "checkpoint_every": max(1, finetune_steps)},
    }
    raw.update(extra)
    return raw


def run(raw: dict, overrides: list[str]) -> tuple[dict, float, object]:
    spec = build_spec(apply_overrides(raw, overrides))
    started = time.perf_counter()
    summary = run_job(spec, progress=False)
    return summary, time.perf_counter() - started, spec


def costs(summary: dict, spec) -> dict:
    from moedisco.models.experts import with_checkpoint_model

    spec = with_checkpoint_model(spec)
    config = spec_config(spec)
    flop = flop_cost(spec, parameter_counts(config), {})
    return {"ledger_usd": summary["cost"]["total_usd"], "flop_usd": flop["total_usd"],
            "flop_submodels_usd": flop["submodels_usd"], "flop_finetune_usd": flop["finetune_usd"],
            "flop_warmup_usd": flop["warmup_usd"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/moedisco_extend_bench"),
                        help="jobs already finished there are reused (a variant added later trains only itself)")
    parser.add_argument("--new-domain", default="code")
    parser.add_argument("--submodel-steps", type=int, default=480, help="per expert, in the base and scratch jobs")
    parser.add_argument("--finetune-steps", type=int, default=150, help="the base job's fine-tune")
    parser.add_argument("--extension-steps", type=int, default=480, help="the new expert's submodel steps")
    parser.add_argument("--extension-finetune", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--variants", nargs="+", default=["frozen:router"],
                        help="extensions to measure, each `shared:finetune[:replay_fraction]` (extend.shared, "
                             "extend.finetune, extend.replay_fraction; default replay 0.5)")
    add_job_arguments(parser, "merge.weighting=samples")
    args = parser.parse_args()
    if args.quick:
        args.submodel_steps, args.finetune_steps, args.extension_steps, args.extension_finetune = 16, 8, 16, 4
        args.warmup = 4
    held_out = split_corpus(args.work / "data", args.new_domain)

    # Scratch trains the base's and the extension's sequences together: 5 experts x S' + F' = 4 S + E_S + F + E_F.
    scratch_steps = round((4 * args.submodel_steps + args.extension_steps) / 5)
    scratch_ft = args.finetune_steps + args.extension_finetune
    jobs, seconds, specs = {}, {}, {}
    jobs["scratch"], seconds["scratch"], specs["scratch"] = run(
        job_spec(args, "scratch", "all", 5, scratch_steps, scratch_ft), args.set)
    tokenizer = {"path": str(args.work / "scratch" / "data" / "tokenizer"), "vocab_size": 2048}  # size: the estimate
    jobs["base"], seconds["base"], specs["base"] = run(
        {**job_spec(args, "base", "old", 4, args.submodel_steps, args.finetune_steps), "tokenizer": tokenizer},
        args.set)
    domains = domain_sequences(held_out, load_tokenizer(Path(tokenizer["path"])), 128)
    losses = {name: domain_losses(args.work / name / "final", domains) for name in jobs}
    cost = {name: costs(jobs[name], specs[name]) for name in jobs}
    old = [d.name for d in domains if d.name != args.new_domain]
    mean = lambda model, names: sum(losses[model][n] for n in names) / len(names)  # noqa: E731
    variants = {}
    for variant in args.variants:
        shared, train, *replay = variant.split(":")
        name = f"extension_{shared}_{train}" + (f"_replay{replay[0]}" if replay else "")
        extend = {"base": str(args.work / "base"), "shared": shared, "finetune": train,
                  "replay_fraction": float(replay[0]) if replay else 0.5}
        jobs[name], seconds[name], specs[name] = run(
            {**job_spec(args, name, "new", 4, args.extension_steps, args.extension_finetune), "method": "extend",
             "extend": extend}, args.set)
        retired = f"{name}_retired"
        jobs[retired], seconds[retired], _ = run(
            {"name": retired, "output_dir": str(args.work / retired), "method": "retire",
             "retire": {"base": str(args.work / name), "experts": [4]}}, [])
        losses[name] = domain_losses(args.work / name / "final", domains)
        losses[retired] = domain_losses(args.work / retired / "final", domains)
        cost[name] = costs(jobs[name], specs[name])
        variants[name] = {
            "extend": extend,
            "new_domain_vs_scratch": losses[name][args.new_domain] - losses["scratch"][args.new_domain],
            "new_domain_vs_base": losses[name][args.new_domain] - losses["base"][args.new_domain],
            "old_domains_vs_base_max": max(abs(losses[name][n] - losses["base"][n]) for n in old),
            "old_domains_worst_increase": max(losses[name][n] - losses["base"][n] for n in old),
            "old_domains_mean_vs_base": mean(name, old) - mean("base", old),
            "old_domains_mean_vs_scratch": mean(name, old) - mean("scratch", old),
            "retired_vs_base_max": max(abs(losses[retired][n] - losses["base"][n]) for n in old),
            "cost_share_ledger": cost[name]["ledger_usd"] / cost["scratch"]["ledger_usd"],
            "cost_share_flop": cost[name]["flop_usd"] / cost["scratch"]["flop_usd"],
            "versus_rerun": jobs[name]["versus_rerun"],
        }
    report = {
        "config": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "scratch_submodel_steps": scratch_steps, "scratch_finetune_steps": scratch_ft},
        "held_out_tokens": {d.name: d.sequences.numel() for d in domains},
        "losses": losses, "seconds": seconds, "cost": cost, "variants": variants,
    }
    publish(report, args.out)


if __name__ == "__main__":
    main()
