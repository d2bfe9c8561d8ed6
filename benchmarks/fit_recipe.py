"""Fit `recipe: auto`'s rule (`moedisco.config.recipe.RecipeRule`) to paper_table grids over the cheap phase's share.

    python benchmarks/fit_recipe.py runs/grid/B600.json runs/grid/B1200.json runs/grid/B2400.json

Each file is one `benchmarks/paper_table.py` run at one baseline budget B with one or more `--submodel-steps`
(seeds and files at the same budget pool). The cheap
share of a run is its submodels' sequences (E x S x batch) over the baseline's (B x batch). The rule takes the share
whose FLOP cost ratio at equal quality is lowest on average over the budgets (every run of a share, each budget and
seed, must reach the baseline's loss), then fits the fine-tune length that reached it there, as a share of the
baseline's sequences, to a power of B (least squares in log-log), raised until it covers every measured point: a job given that length
reaches the baseline's loss at each measured budget. Prints JSON: the grid, the rule, the residuals.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path


def grid_points(files: list[Path], clustering: str) -> list[dict]:
    """One point per (budget, MoE-DisCo run of `clustering`, seed): its cheap share, fine-tune share and cost
    ratio."""
    points = []
    for path in files:
        result = json.loads(path.read_text())
        settings, budget = result["settings"], result["settings"]["baseline_steps"]
        for seed, runs in result["runs"].items():
            base = next(run for name, run in runs.items() if name.startswith("full_parameter"))
            for name, run in runs.items():
                if not name.startswith(f"{clustering}-"):
                    continue
                sequences = base["tokens"]  # the baseline's tokens: B x batch x length
                points.append({
                    "budget": budget, "seed": int(seed), "run": name,
                    "cheap_share": run["tokens_by_stage"].get("submodel", 0) / sequences,
                    "finetune_share": None if run["reached_at"] is None else
                    run["tokens_by_stage"]["finetune"] / sequences,
                    "cost_ratio": run["cost_ratio"]["flop"] if run["reached_at"] is not None else None,
                    "settings": {k: settings[k] for k in ("max_documents", "finetune_eval_every")},
                })
    return points


def best_share(points: list[dict]) -> float:
    budgets = {p["budget"] for p in points}
    by_share: dict[float, list[dict]] = {}
    for p in points:
        by_share.setdefault(round(p["cheap_share"], 3), []).append(p)
    # A share qualifies only if every one of its runs (each budget, each seed) reached the baseline's loss.
    complete = {share: ps for share, ps in by_share.items()
                if {p["budget"] for p in ps} == budgets and all(p["cost_ratio"] is not None for p in ps)}
    if not complete:
        sys.exit("no cheap share reached the baseline's loss at every budget: nothing to fit")
    return min(complete, key=lambda share: statistics.fmean(p["cost_ratio"] for p in complete[share]))


def steps_per_round(run: str) -> int:
    """Submodel steps between two syncs, from paper_table's run name (`kmeans-S600-...-r4-nesterov`)."""
    steps = int(re.search(r"-S(\d+)-", run).group(1))
    rounds = re.search(r"-r(\d+)", run)
    return round(steps / (int(rounds.group(1)) if rounds else 1))


def fit_power(points: list[dict]) -> tuple[float, float, list[float]]:
    """finetune_share = a x (B / 1000) ** p, least squares in logs, `a` raised to cover every point."""
    xs = [math.log(p["budget"] / 1000) for p in points]
    ys = [math.log(p["finetune_share"]) for p in points]
    if len(set(xs)) > 1:
        slope, intercept = statistics.linear_regression(xs, ys)
    else:
        slope, intercept = 0.0, statistics.fmean(ys)
    residuals = [y - (intercept + slope * x) for x, y in zip(xs, ys)]
    return math.exp(intercept + max(residuals)), slope, residuals


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="paper_table JSON outputs (any budgets).")
    parser.add_argument("--clustering", default="kmeans", help="The runs fitted to (the default clustering).")
    args = parser.parse_args(argv)
    points = grid_points(args.files, args.clustering)
    share = best_share(points)
    chosen = [p for p in points if round(p["cheap_share"], 3) == share and p["finetune_share"] is not None]
    at_1000, exponent, residuals = fit_power(chosen)
    output = {"benchmark": "fit_recipe", "files": [str(f) for f in args.files], "grid": points,
              "rule": {"cheap_share": share, "finetune_share_at_1000": round(at_1000, 4),
                       "finetune_share_exponent": round(exponent, 4),
                       "steps_per_round": sorted({steps_per_round(p["run"]) for p in chosen})},
              "log_residuals": residuals}
    print(json.dumps(output, indent=1))
    return output


if __name__ == "__main__":
    main()
