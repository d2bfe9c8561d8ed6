"""The paper's Table 1 / Table 3 / Fig. 6 at small scale, at equal quality and over seeds (issue 27).

    python benchmarks/paper_table.py --quick                       # a few minutes on a laptop CPU
    python benchmarks/paper_table.py --baseline-steps 1200 --submodel-steps 150 300 --seeds 0 1 2 --tasks

Runs, for each seed, on one corpus with one tiny MoE config, tokenizer and held-out split:
  * the full-parameter baseline for B steps (expensive tier), once per `--baseline-schedule` (cosine and
    warmup-stable-decay by default): the target is the best of their final held-out losses;
  * MoE-DisCo for every combination of clustering x submodel steps x warm-up x router init x merge x sync rounds:
    E submodels x S steps (cheap tier), merge, then the fine-tune (expensive tier) with a warmup-stable-decay
    schedule capped at F steps (default F = B). The equal-quality search (`_equal_quality.AnnealSearch`) anneals the
    fine-tune's stable checkpoints and finds the shortest annealed fine-tune that reaches the target: cost at equal
    quality, as the paper's Tables 1 and 3 measure it, with the fine-tune annealed where it stops as the baseline
    was. `--fixed-finetune` trains all F steps instead.
Prints one JSON object: per seed and run the held-out loss after the merge (fine-tune step 0), the annealed
fine-tune's length that reaches the target, total tokens, cost under two models up to that point, and (`--tasks`)
the downstream scores of the best baseline and of each run's annealed model (lm-eval); `summary` has each run's
mean and spread over the seeds:
  (a) `wallclock`: this machine's seconds per stage priced at each tier's rate (one CPU stands in for both tiers);
  (b) `flop`: `moedisco.planning.cost.flop_cost_usd` per stage: 6 (8 recomputed) x active parameters x tokens /
      (device bf16 peak x its efficiency) x price; `flop_equal_efficiency` gives the cheap tier the expensive one's
      efficiency, as the paper's comparison implicitly does.
`cost_ratio` = run total / baseline total under each model, each against the same model (wall time against wall
time, FLOPs against FLOPs); `step_ratio` = expensive-tier steps to reach the target / B. A run that does not reach
it within F steps reports null steps and its costs after F steps. Writes the loss curves (paper Fig. 4 style, the
first seed) to `--plot`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _equal_quality import AnnealSearch

from moedisco.config.loading import apply_overrides, build_spec
from moedisco.config.recipe import auto_recipe
from moedisco.job.layout import JobPaths
from moedisco.job.metrics import read_metrics
from moedisco.job.registry import STAGES, tier_of
from moedisco.models.architecture import read_config
from moedisco.planning.cost import flop_cost_usd, price_row
from moedisco.planning.model_size import parameter_counts
from moedisco.runner.job_runner import run_job
from moedisco.stages.finetune import anneal
from moedisco.training.loop import StopRequested

TRAINED_STAGES = tuple(stage.name for stage in STAGES if stage.trained)


def base_spec(args) -> dict:
    raw = apply_overrides(yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text()), args.set)
    raw["data"].update({"train": str(args.data), "max_documents": args.max_documents})
    for section, steps in (("finetune", args.finetune_steps), ("full_parameter", args.baseline_steps)):
        raw[section].update({"steps": steps, "checkpoint_every": max(steps, 1), "eval_batches": args.eval_batches})
    raw["submodel"]["eval_batches"] = args.eval_batches
    every = args.finetune_eval_every
    # The search anneals the fine-tune's checkpoints, so it checkpoints (and keeps) every `every` steps; it needs
    # no other evaluation of the stable phase than the curve's.
    raw["finetune"].update({"schedule": "wsd", "checkpoint_every": every,
                            "eval_every": max(every, args.finetune_steps // 20),
                            "keep_checkpoints": args.finetune_steps // every + 1})
    raw["full_parameter"]["eval_every"] = max(1, args.baseline_steps // 20)
    return raw


def variants(args) -> list[tuple[str, dict]]:
    runs = [(f"full_parameter-{schedule}", {"method": "full_parameter", "full_parameter": {"schedule": schedule}})
            for schedule in args.baseline_schedule]
    grid = itertools.product(args.clustering, args.submodel_steps, args.warmup, args.router_init,
                             args.shared_lr_scale, args.weighting, args.sync_rounds, args.outer_optimizer)
    for clustering, steps, warmup, router, scale, weighting, rounds, outer in grid:
        name = (f"{clustering}-S{steps}-w{warmup}-{router}-s{scale:g}-{weighting}"
                + (f"-r{rounds}" if rounds != 1 else "") + (f"-{outer}" if outer != "average" else ""))
        runs.append((name, {"cluster": {"method": clustering}, "merge": {"router_init": router, "weighting": weighting},
                            "submodel": {"steps": steps, "checkpoint_every": steps,
                                         "eval_every": max(1, steps // 5)},
                            "branch": {"warmup_steps": warmup, "shared_lr_scale": scale, "sync_rounds": rounds,
                                       "outer_optimizer": outer}}))
    return runs


def build_variant(raw: dict, name: str, changes: dict, root: Path, seed: int):
    spec = json.loads(json.dumps(raw))
    for key, value in changes.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    spec.update({"name": name, "output_dir": str(root / f"seed{seed}" / name), "seed": seed})
    return build_spec(spec)


def curve(records: list[dict], stage: str) -> list[tuple[int, float]]:
    points = [(r["step"], r["eval_loss"]) for r in records if r["stage"] == stage and r.get("eval_loss") is not None]
    if stage == "finetune":
        points = [(0, r["eval_loss"]) for r in records if r["stage"] == "merge"][-1:] + [p for p in points if p[0] > 0]
    return points


COST_MODELS = ("flop", "flop_equal_efficiency")


def first_step_reaching(points: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, loss in points if loss <= target), None)


def flop_costs(spec, tokens: dict[tuple, int], recomputed: set[str], equal_efficiency: bool = False) -> dict:
    """Dollars per stage under the FLOP model (`moedisco.planning.cost.flop_cost_usd`), from the tokens each
    (stage, expert) trained on; `recomputed`: the stages that trained with activation checkpointing.
    `equal_efficiency` gives every device the expensive tier's efficiency (the paper's implicit assumption)."""
    counts = parameter_counts(read_config(spec.output_dir / "source"))
    res = spec.resources
    warmup_active = counts["submodel"] if spec.branch.warmup_model == "dense" else counts["active"]
    active = {"warmup": warmup_active, "submodel": counts["submodel"], "finetune": counts["active"],
              "full_parameter": counts["active"]}
    reference = res.devices[res.finetune_tier.device_type].efficiency
    costs: dict[str, float] = {}
    for (stage, _), stage_tokens in tokens.items():
        kind = tier_of(res, stage).device_type
        device = res.devices[kind]
        if equal_efficiency:
            device = device.model_copy(update={"efficiency": reference})
        usd = flop_cost_usd(active[stage], stage_tokens, device, res.prices[kind], recompute=stage in recomputed)
        costs[stage] = costs.get(stage, 0.0) + usd["usd"]
    return costs


def trained_tokens(records: list[dict]) -> dict[tuple, int]:
    """Tokens each (stage, expert) trained on, from its last metrics record."""
    return {(r["stage"], r.get("expert")): r["tokens"] for r in records
            if r["stage"] in TRAINED_STAGES and "tokens" in r}


def searched_finetune(search: AnnealSearch | None, merge_loss: float | None) -> dict | None:
    """The shortest annealed fine-tune the search found to reach its target (0 steps when the merged model already
    did), or None."""
    if search is None:
        return None
    if merge_loss is not None and merge_loss <= search.target:
        return {"reached_at": 0, "annealed_from": None, "annealed_loss": merge_loss, "seconds": 0.0}
    step = search.smallest()
    if step is None:
        return None
    return {"reached_at": search.length(step), "annealed_from": step, "annealed_loss": search.losses[step],
            "seconds": search.seconds[step], "anneals": {str(k): v for k, v in sorted(search.losses.items())}}


def summarise(spec, started: float, search: AnnealSearch | None = None) -> dict:
    """A run's losses, tokens and costs; with `search`, the fine-tune counted is the shortest annealed one that
    reached the target (its length, tokens, seconds and loss: the model it delivers), not the stable run the
    search went on with. `started`: `time.perf_counter()` when the run began (the search's anneals count)."""
    paths = JobPaths(spec.output_dir)
    records = read_metrics(paths.metrics)
    tokens = trained_tokens(records)
    wall = {}
    for row in json.loads(paths.cost.read_text())["stages"]:
        wall[row["stage"]] = wall.get(row["stage"], 0.0) + row["usd"]
    finetune_seconds = None
    stopped = [r for r in records if r["stage"] == "finetune" and r.get("seconds") is not None]
    if stopped and "finetune" not in wall:  # stopped by the search: no ledger row, its seconds so far
        finetune_seconds = stopped[-1]["seconds"]
    main_stage = "full_parameter" if spec.method == "full_parameter" else "finetune"
    points = curve(records, main_stage)
    merge = next((r for r in records if r["stage"] == "merge"), {})
    run = {"searched": search is not None, "reached_at": None, "final_loss": points[-1][1],
           "stable_final_loss": points[-1][1]}
    if (found := searched_finetune(search, merge.get("eval_loss"))) is not None:
        finetune_seconds = found.pop("seconds")
        tokens[("finetune", None)] = found["reached_at"] * spec.finetune.batch_size * spec.data.sequence_length
        run.update(found, final_loss=found["annealed_loss"])
    if finetune_seconds is not None:
        wall["finetune"] = price_row("finetune", tier_of(spec.resources, "finetune"), spec.resources.prices,
                                     finetune_seconds).usd
    recomputed = {r["stage"] for r in records if (r.get("memory_measures") or {}).get("activation_checkpointing")}
    flop = {model: flop_costs(spec, tokens, recomputed, model == "flop_equal_efficiency") for model in COST_MODELS}
    return {**run, "curve": points, "loss_at_merge": merge.get("eval_loss"),
            "oracle_loss_at_merge": merge.get("oracle_eval_loss"), "tokens": sum(tokens.values()),
            "tokens_by_stage": {stage: sum(n for (s, _), n in tokens.items() if s == stage)
                                for stage in {s for s, _ in tokens}},
            "recomputed_stages": sorted(recomputed),
            "cost_usd": {"wallclock": wall, "wallclock_total": sum(wall.values()), **flop,
                         **{f"{model}_total": sum(flop[model].values()) for model in COST_MODELS}},
            "run_seconds": round(time.perf_counter() - started, 1)}


def run_variant(spec, target: float | None, every: int) -> AnnealSearch | None:
    search = None if target is None else AnnealSearch(spec, target, every)
    try:
        run_job(spec, progress=False, should_stop=search)
    except StopRequested:
        pass  # an anneal reached the target: the search bisects the checkpoints before it
    return search


def model_at(spec, run: dict) -> Path:
    """The model folder a run delivers at equal quality (its annealed fine-tune), for the downstream tasks."""
    from moedisco.stages.prepare import load_tokenizer

    paths = JobPaths(spec.output_dir)
    if spec.method == "full_parameter" or run.get("annealed_from") is None:
        return paths.final if (paths.final / "config.json").is_file() else paths.merged
    folder = paths.root / "at_target"
    if not (folder / "config.json").is_file():
        model, _ = anneal(paths, run["annealed_from"])  # done already: loads the annealed weights
        model.config.output_router_logits = False
        model.save_pretrained(folder)
        load_tokenizer(paths.tokenizer).save_pretrained(folder)
    return folder


def downstream(results: dict, specs: dict, args) -> None:
    """Each run's scores on `args.tasks` (lm-eval), for the model it delivers at equal quality."""
    from moedisco.config.spec import EvaluateConfig
    from moedisco.stages.evaluate import evaluate_model

    cfg = EvaluateConfig(tasks=args.tasks, limit=args.eval_limit, datasets_cache=args.datasets_cache)
    for name, run in results.items():
        if name in specs:
            run["downstream"] = evaluate_model(model_at(specs[name], run), cfg)


def best_baseline(results: dict) -> str:
    return min((name for name in results if name.startswith("full_parameter")),
               key=lambda name: results[name]["final_loss"])


def compare(results: dict, baseline_steps: int) -> None:
    """Each MoE-DisCo run against the best baseline: the fine-tune steps to its loss, and the cost ratios."""
    base = results[best_baseline(results)]
    for name, run in results.items():
        if name.startswith("full_parameter"):
            continue
        if not run["searched"]:  # --fixed-finetune: the first evaluated step at the target, if any
            run["reached_at"] = first_step_reaching(run["curve"], base["final_loss"])
        step = run["reached_at"]
        run["target"] = base["final_loss"]
        run["finetune_steps_to_baseline"] = step
        run["step_ratio"] = None if step is None else step / baseline_steps
        run["cost_ratio"] = {m: run["cost_usd"][f"{m}_total"] / base["cost_usd"][f"{m}_total"]
                             for m in ("wallclock", *COST_MODELS)}
        run["beats_baseline_at_step0"] = run["loss_at_merge"] <= base["final_loss"]


SUMMARISED = {"final_loss": lambda r: r["final_loss"], "loss_at_merge": lambda r: r.get("loss_at_merge"),
              "finetune_steps_to_baseline": lambda r: r.get("finetune_steps_to_baseline"),
              "step_ratio": lambda r: r.get("step_ratio"),
              "cost_ratio_flop": lambda r: (r.get("cost_ratio") or {}).get("flop"),
              "cost_ratio_flop_equal_efficiency": lambda r: (r.get("cost_ratio") or {}).get("flop_equal_efficiency")}


def summary(per_seed: dict[int, dict]) -> dict:
    """Per run name, the mean, sample standard deviation and values over the seeds (a run that missed the target
    in some seed has fewer values than seeds, and `reached` says in how many it got there)."""
    out = {}
    for name in next(iter(per_seed.values())):
        runs = [results[name] for results in per_seed.values()]
        out[name] = {"seeds": len(runs)}
        for key, value_of in SUMMARISED.items():
            values = [v for v in map(value_of, runs) if v is not None]
            if values:
                out[name][key] = {"mean": statistics.fmean(values), "values": values,
                                  "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        out[name]["reached"] = sum(r.get("reached_at") is not None for r in runs)
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for name, run in results.items():
        steps, losses = zip(*run["curve"])
        ax.plot(steps, losses, label=name, linewidth=2.5 if name.startswith("full_parameter") else 1.2)
        if run.get("annealed_from") is not None:
            ax.scatter([run["reached_at"]], [run["annealed_loss"]], marker="*", s=80)
    ax.set(xlabel="expensive-tier step (baseline training / MoE-DisCo fine-tune; * its annealed end)",
           ylabel="held-out loss", title="MoE-DisCo fine-tune vs full-parameter training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "examples" / "data" / "corpus.jsonl")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-paper")
    parser.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "paper_table.png")
    parser.add_argument("--max-documents", type=int, default=3347, help="Documents of the corpus (bundled: 3347).")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="Each seed runs everything once.")
    parser.add_argument("--baseline-steps", type=int, default=600)
    parser.add_argument("--baseline-schedule", nargs="+", default=["cosine", "wsd"],
                        help="The baseline's schedules; the target is the best of their final losses.")
    parser.add_argument("--submodel-steps", nargs="+", type=int, default=[150], help="submodel.steps values.")
    parser.add_argument("--recipe", choices=["manual", "auto"], default="manual",
                        help="`auto`: submodel batch, steps and sync rounds from `recipe: auto`'s rule for B (the "
                        "fine-tune is searched for either way).")
    parser.add_argument("--finetune-steps", type=int, default=None, help="Cap on the fine-tune (default: B).")
    parser.add_argument("--finetune-eval-every", type=int, default=20,
                        help="Fine-tune steps between the checkpoints the search anneals: its resolution.")
    parser.add_argument("--fixed-finetune", action="store_true",
                        help="Train all --finetune-steps instead of searching for the target.")
    parser.add_argument("--tasks", nargs="*", default=[], help="lm-eval downstream tasks for every model.")
    parser.add_argument("--eval-limit", type=int, default=200, help="Examples per downstream task.")
    parser.add_argument("--datasets-cache", type=Path, default=None, help="Local datasets cache for --tasks.")
    parser.add_argument("--eval-batches", type=int, default=32, help="Held-out batches per evaluation.")
    parser.add_argument("--clustering", nargs="+", default=["kmeans", "random"])
    parser.add_argument("--warmup", nargs="+", type=int, default=[30])
    parser.add_argument("--router-init", nargs="+", default=["centroid"])
    parser.add_argument("--shared-lr-scale", nargs="+", type=float, default=[1.0])
    parser.add_argument("--weighting", nargs="+", default=["fisher"], help="merge.weighting values to compare.")
    parser.add_argument("--sync-rounds", nargs="+", type=int, default=[4], help="branch.sync_rounds values.")
    parser.add_argument("--outer-optimizer", nargs="+", default=["nesterov"], help="branch.outer_optimizer values.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Override the base spec (examples/tiny.yaml), e.g. model.moe_intermediate_size=512.")
    parser.add_argument("--quick", action="store_true", help="Small steps: finishes in a few minutes.")
    args = parser.parse_args(argv)
    if args.quick:  # smaller defaults, but an explicitly given value wins
        given = set(argv if argv is not None else sys.argv[1:])
        for flag, value in (("--max-documents", 800), ("--baseline-steps", 200), ("--submodel-steps", [50]),
                            ("--eval-batches", 8)):
            if flag not in given:
                setattr(args, flag.lstrip("-").replace("-", "_"), value)
    if args.finetune_steps is None:
        args.finetune_steps = args.baseline_steps
    return args


def resolve_recipe(args, raw: dict) -> None:
    """`--recipe auto`: the submodel batch, steps and sync rounds `recipe: auto` gives the budget B of `raw`."""
    submodels = raw["model"]["num_experts"] // raw["model"].get("experts_per_submodel", 1)  # JobSpec.num_clusters
    chosen = auto_recipe(args.baseline_steps, raw["full_parameter"]["batch_size"], submodels,
                         raw["finetune"]["batch_size"])
    raw["submodel"]["batch_size"] = chosen.submodel_batch
    args.submodel_steps, args.sync_rounds = [chosen.submodel_steps], [chosen.sync_rounds]


def run_seed(args, raw: dict, seed: int) -> tuple[dict, dict]:
    """The baselines, then every MoE-DisCo variant against the best of them, all with `seed`."""
    results, specs = {}, {}
    for name, changes in variants(args):
        specs[name] = spec = build_variant(raw, name, changes, args.out, seed)
        baseline = name.startswith("full_parameter")
        target = None if args.fixed_finetune or baseline else results[best_baseline(results)]["final_loss"]
        started = time.perf_counter()
        search = run_variant(spec, target, args.finetune_eval_every)
        results[name] = summarise(spec, started, search)
        print(f"seed {seed} {name}: {json.dumps({k: v for k, v in results[name].items() if k != 'curve'})}",
              file=sys.stderr, flush=True)
    compare(results, args.baseline_steps)
    if args.tasks:
        downstream(results, specs, args)
    return results, specs


def main(argv=None) -> dict:
    args = parse_args(argv)
    raw = base_spec(args)
    if args.recipe == "auto":
        resolve_recipe(args, raw)
    per_seed = {seed: run_seed(args, raw, seed)[0] for seed in args.seeds}
    plot(per_seed[args.seeds[0]], args.plot)
    output = {"benchmark": "paper_table", "command": " ".join(sys.argv),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "summary": summary(per_seed), "runs": per_seed}
    print(json.dumps(output, indent=1))
    return output


if __name__ == "__main__":
    main()
