"""The paper's Table 1 / Table 3 / Fig. 6 at small scale, plus the merge-quality grid (issue: warm-up x router init).

    python benchmarks/paper_table.py --quick                       # a few minutes on a laptop CPU
    python benchmarks/paper_table.py --data my.jsonl --warmup 0 100 --router-init concat centroid random

Runs, on one corpus with one tiny MoE config, tokenizer and held-out split:
  * the full-parameter baseline for B steps (expensive tier);
  * MoE-DisCo for every combination of clustering x warm-up steps x router init: E submodels x S steps (cheap tier),
    merge, then the fine-tune (expensive tier) until the merged model reaches the baseline's final held-out loss,
    capped at F steps (default F = B): cost at equal quality, as the paper's Tables 1 and 3 measure it.
    `--fixed-finetune` trains all F steps instead.
Prints one JSON object: per run the held-out loss after the merge (fine-tune step 0) and at the end, the fine-tune
step at which it first reaches the baseline's final loss, total tokens seen, cost under two models up to that
point, and (`--tasks`) the downstream scores of the baseline and of each run's model there (lm-eval):
  (a) `wallclock`: this machine's seconds per stage priced at each tier's rate (one CPU stands in for both tiers);
  (b) `flop`: 6 x active parameters x tokens / (device bf16 peak x utilisation) x price, per stage.
`cost_ratio` = run total / baseline total under each model, each against the same model (wall time against wall
time, FLOPs against FLOPs); `step_ratio` = expensive-tier steps to reach the baseline's final loss / B. A run that
does not reach it within F steps reports null steps and its costs after F steps. Writes the loss curves (paper
Fig. 4 style) to `--plot`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moedisco.config.loading import apply_overrides, build_spec  # noqa: E402
from moedisco.job.layout import JobPaths  # noqa: E402
from moedisco.job.metrics import read_metrics  # noqa: E402
from moedisco.job.registry import STAGES, tier_of  # noqa: E402
from moedisco.models.architecture import read_config
from moedisco.planning.cost import flop_cost_usd, price_row  # noqa: E402
from moedisco.planning.estimate import DEFAULT_UTILISATION
from moedisco.planning.memory_plan import parameter_counts
from moedisco.runner.job_runner import run_job  # noqa: E402
from moedisco.training.checkpoint import checkpoint_dir
from moedisco.training.loop import StopRequested

TRAINED_STAGES = tuple(stage.name for stage in STAGES if stage.trained)


def base_spec(args) -> dict:
    raw = apply_overrides(yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text()), args.set)
    raw["data"].update({"train": str(args.data), "max_documents": args.max_documents})
    for section, steps in (("submodel", args.submodel_steps), ("finetune", args.finetune_steps),
                           ("full_parameter", args.baseline_steps)):
        raw[section].update({"steps": steps, "checkpoint_every": max(steps, 1), "eval_batches": args.eval_batches})
    raw["finetune"]["eval_every"] = args.finetune_eval_every or max(1, args.finetune_steps // 10)
    # The stopping rule looks at the loss at checkpoints, so the fine-tune checkpoints where it evaluates.
    raw["finetune"]["checkpoint_every"] = raw["finetune"]["eval_every"]
    raw["full_parameter"]["eval_every"] = max(1, args.baseline_steps // 20)
    raw["submodel"]["eval_every"] = max(1, args.submodel_steps // 5)
    return raw


def variants(args) -> list[tuple[str, dict]]:
    runs = [("full_parameter", {"method": "full_parameter"})]
    grid = itertools.product(args.clustering, args.warmup, args.router_init, args.shared_lr_scale, args.weighting,
                             args.sync_rounds, args.outer_optimizer)
    for clustering, warmup, router, scale, weighting, rounds, outer in grid:
        name = (f"{clustering}-w{warmup}-{router}-s{scale:g}-{weighting}" + (f"-r{rounds}" if rounds != 1 else "")
                + (f"-{outer}" if outer != "average" else ""))
        runs.append((name, {"cluster": {"method": clustering}, "merge": {"router_init": router, "weighting": weighting},
                            "branch": {"warmup_steps": warmup, "shared_lr_scale": scale, "sync_rounds": rounds,
                                       "outer_optimizer": outer}}))
    return runs


def build_variant(raw: dict, name: str, changes: dict, root: Path):
    spec = json.loads(json.dumps(raw))
    for key, value in changes.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    spec.update({"name": name, "output_dir": str(root / name)})
    return build_spec(spec)


def curve(records: list[dict], stage: str) -> list[tuple[int, float]]:
    points = [(r["step"], r["eval_loss"]) for r in records if r["stage"] == stage and r.get("eval_loss") is not None]
    if stage == "finetune":
        points = [(0, r["eval_loss"]) for r in records if r["stage"] == "merge"][-1:] + [p for p in points if p[0] > 0]
    return points


def first_step_reaching(points: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, loss in points if loss <= target), None)


def flop_costs(spec, records: list[dict]) -> dict[str, float]:
    """Dollars per stage under the FLOP model, from the tokens each stage actually trained on."""
    counts = parameter_counts(read_config(spec.output_dir / "source"))
    res = spec.resources
    warmup_active = counts["submodel"] if spec.branch.warmup_model == "dense" else counts["active"]
    active = {"warmup": warmup_active, "submodel": counts["submodel"], "finetune": counts["active"],
              "full_parameter": counts["active"]}
    costs: dict[str, float] = {}
    last_tokens: dict[tuple, int] = {}
    for r in records:
        if r["stage"] in TRAINED_STAGES and "tokens" in r:
            last_tokens[(r["stage"], r.get("expert"))] = r["tokens"]
    for (stage, _), tokens in last_tokens.items():
        device = tier_of(res, stage).device_type
        usd = flop_cost_usd(active[stage], tokens, res.devices[device].bf16_tflops, DEFAULT_UTILISATION,
                            res.prices[device])["usd"]
        costs[stage] = costs.get(stage, 0.0) + usd
    return costs


def summarise(spec, seconds: float) -> dict:
    paths = JobPaths(spec.output_dir)
    records = read_metrics(paths.metrics)
    cost = json.loads(paths.cost.read_text())
    wall = {}
    for row in cost["stages"]:
        wall[row["stage"]] = wall.get(row["stage"], 0.0) + row["usd"]
    stopped = [r for r in records if r["stage"] == "finetune" and r.get("seconds") is not None]
    if stopped and "finetune" not in wall:  # stopped at the baseline's loss: no ledger row, its seconds so far
        wall["finetune"] = price_row("finetune", tier_of(spec.resources, "finetune"), spec.resources.prices,
                                     stopped[-1]["seconds"]).usd
    flop = flop_costs(spec, records)
    tokens = {}
    for r in records:
        if r["stage"] in TRAINED_STAGES and "tokens" in r:
            tokens[(r["stage"], r.get("expert"))] = r["tokens"]
    main_stage = "full_parameter" if spec.method == "full_parameter" else "finetune"
    points = curve(records, main_stage)
    merge = next((r for r in records if r["stage"] == "merge"), {})
    return {"curve": points, "final_loss": points[-1][1], "loss_at_merge": merge.get("eval_loss"),
            "oracle_loss_at_merge": merge.get("oracle_eval_loss"), "tokens": sum(tokens.values()),
            "cost_usd": {"wallclock": wall, "flop": flop, "wallclock_total": sum(wall.values()),
                         "flop_total": sum(flop.values())}, "run_seconds": round(seconds, 1)}


def loss_reached(spec, target: float):
    """The job's `should_stop`: true once the merged model's held-out loss (merge or fine-tune) is <= `target`;
    the runner polls it before each stage and at each fine-tune checkpoint, which is where it evaluates."""
    metrics = JobPaths(spec.output_dir).metrics
    return lambda: any(loss <= target for _, loss in curve(read_metrics(metrics), "finetune"))


def run_variant(spec, target: float | None) -> None:
    try:
        run_job(spec, progress=False, should_stop=None if target is None else loss_reached(spec, target))
    except StopRequested:
        pass  # the baseline's loss is reached: the fine-tune's newest checkpoint is the model at equal quality


def model_at(spec, step: int | None) -> Path:
    """A model folder of the run at fine-tune step `step` (None: where it ended), for the downstream tasks."""
    from safetensors.torch import load_file

    from moedisco.stages.finetune import load_moe
    from moedisco.stages.prepare import load_tokenizer

    paths = JobPaths(spec.output_dir)
    if spec.method == "full_parameter" or (paths.final / "config.json").is_file():
        return paths.final
    if step == 0:
        return paths.merged
    folder = paths.root / "at_baseline_loss"
    model = load_moe(paths.merged)
    model.load_state_dict(load_file(checkpoint_dir(paths.run_dir("finetune"), step) / "model.safetensors"),
                          strict=False)
    model.save_pretrained(folder)
    load_tokenizer(paths.tokenizer).save_pretrained(folder)
    return folder


def downstream(results: dict, specs: dict, args) -> None:
    """Each run's scores on `args.tasks` (lm-eval), at the step where it was stopped."""
    from moedisco.config.spec import EvaluateConfig
    from moedisco.stages.evaluate import evaluate_model

    cfg = EvaluateConfig(tasks=args.tasks, limit=args.eval_limit, datasets_cache=args.datasets_cache)
    for name, run in results.items():
        run["downstream"] = evaluate_model(model_at(specs[name], run.get("finetune_steps_to_baseline")), cfg)


def compare(results: dict, baseline_steps: int) -> None:
    base = results["full_parameter"]
    for name, run in results.items():
        if name == "full_parameter":
            continue
        step = first_step_reaching(run["curve"], base["final_loss"])
        run["finetune_steps_to_baseline"] = step
        run["step_ratio"] = None if step is None else step / baseline_steps
        run["cost_ratio"] = {m: run["cost_usd"][f"{m}_total"] / base["cost_usd"][f"{m}_total"]
                             for m in ("wallclock", "flop")}
        run["beats_baseline_at_step0"] = run["loss_at_merge"] <= base["final_loss"]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for name, run in results.items():
        steps, losses = zip(*run["curve"])
        ax.plot(steps, losses, label=name, linewidth=2.5 if name == "full_parameter" else 1.2)
    ax.set(xlabel="expensive-tier step (baseline training / MoE-DisCo fine-tune)", ylabel="held-out loss",
           title="MoE-DisCo fine-tune vs full-parameter training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "examples" / "data" / "corpus.jsonl")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-paper")
    parser.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "paper_table.png")
    parser.add_argument("--max-documents", type=int, default=3000)
    parser.add_argument("--baseline-steps", type=int, default=600)
    parser.add_argument("--submodel-steps", type=int, default=300)
    parser.add_argument("--finetune-steps", type=int, default=None,
                        help="Cap on the fine-tune, which stops at the baseline's final loss (default: B).")
    parser.add_argument("--finetune-eval-every", type=int, default=None,
                        help="Fine-tune steps between held-out evaluations, i.e. the stopping rule's resolution.")
    parser.add_argument("--fixed-finetune", action="store_true",
                        help="Train all --finetune-steps instead of stopping at the baseline's final loss.")
    parser.add_argument("--tasks", nargs="*", default=["next_paragraph"],
                        help="lm-eval downstream tasks for every model (none: skip).")
    parser.add_argument("--eval-limit", type=int, default=200, help="Examples per downstream task.")
    parser.add_argument("--datasets-cache", type=Path, default=None, help="Local datasets cache for --tasks.")
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--clustering", nargs="+", default=["kmeans", "random"])
    parser.add_argument("--warmup", nargs="+", type=int, default=[0])
    parser.add_argument("--router-init", nargs="+", default=["concat"])
    parser.add_argument("--shared-lr-scale", nargs="+", type=float, default=[1.0])
    parser.add_argument("--weighting", nargs="+", default=["samples"], help="merge.weighting values to compare.")
    parser.add_argument("--sync-rounds", nargs="+", type=int, default=[1], help="branch.sync_rounds values.")
    parser.add_argument("--outer-optimizer", nargs="+", default=["average"], help="branch.outer_optimizer values.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Override the base spec (examples/tiny.yaml), e.g. model.moe_intermediate_size=512.")
    parser.add_argument("--quick", action="store_true", help="Small steps: finishes in a few minutes.")
    args = parser.parse_args(argv)
    if args.quick:  # smaller defaults, but an explicitly given value wins
        given = set(argv if argv is not None else sys.argv[1:])
        for flag, value in (("--max-documents", 800), ("--baseline-steps", 200), ("--submodel-steps", 100)):
            if flag not in given:
                setattr(args, flag.lstrip("-").replace("-", "_"), value)
    if args.finetune_steps is None:
        args.finetune_steps = args.baseline_steps
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    raw = base_spec(args)
    results, specs = {}, {}
    for name, changes in variants(args):
        specs[name] = spec = build_variant(raw, name, changes, args.out)
        started = time.perf_counter()
        target = None if args.fixed_finetune or name == "full_parameter" else results["full_parameter"]["final_loss"]
        run_variant(spec, target)
        results[name] = summarise(spec, time.perf_counter() - started)
    compare(results, args.baseline_steps)
    if args.tasks:
        downstream(results, specs, args)
    plot(results, args.plot)
    output = {"benchmark": "paper_table", "settings": {k: str(v) if isinstance(v, Path) else v
                                                       for k, v in vars(args).items()}, "runs": results}
    print(json.dumps(output, indent=1))
    return output


if __name__ == "__main__":
    main()
