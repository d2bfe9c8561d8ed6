"""The bill as the cloud sends it, against the compute view: the tiny job on the autoscaling local cluster.

    python benchmarks/billing.py                       # 4 experts, 2 cheap nodes at most, 20 s idle timeout
    python benchmarks/billing.py --cheap-max 4 --idle-timeout 30 --out benchmarks/results_billing.json

Starts a head with no worker nodes and Ray's autoscaler v2 (`ray_cluster.autoscaling`), runs `examples/tiny.yaml`
with the Ray runner, waits until the autoscaler has removed every worker node, and then bills the job from the
nodes' whole lives (request to end) and the job's uses of them (`moedisco.planning.billing`). Prints JSON:
billed and compute dollars per stage and in all, and the share of billed node time that was boot, work, waits
between uses (the synchronisation barriers), idle time before scale-down, and within work: evaluation/checkpoints
and steps trained twice. A check: the job's billed seconds plus the cluster's unclaimed ones are the worker
nodes' seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from _common import REPO, publish

sys.path.insert(0, str(REPO))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=REPO / "examples" / "tiny.yaml")
    parser.add_argument("--cheap-max", type=int, default=2, help="Most cheap-4090 nodes at once.")
    parser.add_argument("--idle-timeout", type=float, default=20.0, help="Seconds an idle node is kept.")
    parser.add_argument("--work", type=Path, default=None, help="Job folder (default: a temporary one).")
    parser.add_argument("--out", type=Path, default=None, help="Also write the JSON here.")
    return parser.parse_args()


def wait_for_scale_down(timeout_s: float) -> float:
    """Seconds until the autoscaler removed every worker node (the head stays)."""
    import ray

    from ray_cluster.local_cluster import CONTROL_PLANE_LABEL

    started = time.monotonic()
    key, value = next(iter(CONTROL_PLANE_LABEL.items()))
    while time.monotonic() - started < timeout_s:
        if not [n for n in ray.nodes() if n["Alive"] and n.get("Labels", {}).get(key) != value]:
            break
        time.sleep(1.0)
    return time.monotonic() - started


def final_lives(ledger, resources) -> list:
    """Every worker node's whole life now that it ended; the request times the job's meter matched are kept."""
    from ray_cluster.metering import read_node_lives

    seen = ledger.nodes
    return [replace(life, requested_at=seen[life.node].requested_at) if life.node in seen else life
            for life in read_node_lives(resources)]


def work_shares(paths, busy_by_stage: dict) -> dict:
    """Node-seconds of trained stages' work that was not a training step (evaluation, checkpoints, start-up), and
    that trained steps twice, from the stage markers' summaries (a trainer's `train_seconds` are its steps')."""
    train: dict = {}
    redone = 0.0
    for marker in paths.markers.glob("*.json"):
        summary = json.loads(marker.read_text())
        uses, steps_run, train_s = summary.get("node_uses"), summary.get("steps_run"), summary.get("train_seconds")
        if not uses or not steps_run or train_s is None:
            continue
        key = (uses[0]["stage"], uses[0]["expert"])
        train[key] = train.get(key, 0.0) + train_s
        redone += train_s * summary.get("lost_steps", 0) / steps_run
    overhead = sum(max(0.0, busy_by_stage.get(key, 0.0) - seconds) for key, seconds in train.items())
    return {"eval_checkpoint_startup_s": overhead, "redone_steps_s": redone}


def main() -> None:
    args = parse_args()
    from moedisco.config.loading import load_spec
    from moedisco.job.layout import JobPaths
    from moedisco.planning.billing import attribute
    from moedisco.planning.cost import THIS_JOB, CostLedger, billed_view
    from ray_cluster.local_cluster import LocalClusterSpec, start_local_cluster, stop_local_cluster
    from ray_cluster.orchestrate import run_job_on_ray

    work = args.work or Path(tempfile.mkdtemp(prefix="moedisco-billing-"))
    spec = load_spec(args.spec, [f"output_dir={work / 'job'}", f"resources.idle_timeout_s={args.idle_timeout}"])
    cluster = LocalClusterSpec.from_resources(spec.resources, autoscale=True, idle_timeout_s=args.idle_timeout,
                                              max_nodes={"cheap-4090": args.cheap_max, "cheap-4090-spot": 0,
                                                         "expensive-a100": 1})
    address = start_local_cluster(spec=cluster)
    try:
        import ray

        submitted = time.time()
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
        result = run_job_on_ray(spec)
        job_s = time.time() - submitted
        scale_down_s = wait_for_scale_down(args.idle_timeout + 120)
        ledger = CostLedger(Path(result["output_dir"]) / "cost.json", spec.resources)
        lives = final_lives(ledger, spec.resources)
        ray.shutdown()
    finally:
        stop_local_cluster()
    now = time.time()
    bill = attribute(lives, ledger.uses.values(), spec.resources, now, job_starts={THIS_JOB: ledger.started_at})
    spans = bill.for_job(THIS_JOB)
    view = billed_view(spans, ledger.total_usd(), True)
    node_seconds = sum(life.seconds(now) for life in lives)
    busy: dict = {}
    for span in spans:
        if span.kind == "busy":
            busy[span.stage, span.expert] = busy.get((span.stage, span.expert), 0.0) + span.seconds
    shares = work_shares(JobPaths(result["output_dir"]), busy)
    total_s = view["seconds"]
    compute_by_stage: dict = {}
    for row in ledger.rows:
        compute_by_stage[row.stage] = compute_by_stage.get(row.stage, 0.0) + row.usd
    billed_by_stage: dict = {}
    for row in view["rows"]:
        billed_by_stage[row["stage"]] = billed_by_stage.get(row["stage"], 0.0) + row["usd"]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/billing.py " + " ".join(sys.argv[1:]),
        "cluster": {"autoscaling": True, "cheap_max": args.cheap_max, "a100_max": 1,
                    "idle_timeout_s": args.idle_timeout, "nodes_launched": len(lives),
                    "nodes_by_group": {g: sum(1 for n in lives if n.group == g) for g in {n.group for n in lives}},
                    "scale_down_after_job_s": round(scale_down_s, 1)},
        "job_seconds": round(job_s, 1),
        "usd": {"billed": view["total_usd"], "compute": ledger.total_usd(),
                "billed_over_compute": view["total_usd"] / ledger.total_usd() if ledger.total_usd() else None},
        "usd_by_stage": {stage: {"billed": billed_by_stage.get(stage, 0.0), "compute": compute_by_stage.get(stage, 0.0)}
                         for stage in dict.fromkeys([*billed_by_stage, *compute_by_stage])},
        "billed_seconds": total_s,
        "share_of_billed_time": {
            "boot": view["seconds_by_kind"]["boot"] / total_s,
            "busy": view["seconds_by_kind"]["busy"] / total_s,
            "barrier_and_other_waits": view["seconds_by_kind"]["between"] / total_s,
            "idle_before_scale_down": view["seconds_by_kind"]["idle"] / total_s,
            "eval_checkpoint_startup_within_busy": shares["eval_checkpoint_startup_s"] / total_s,
            "redone_steps_within_busy": shares["redone_steps_s"] / total_s,
        },
        "conservation": {"worker_node_seconds": node_seconds, "job_billed_seconds": total_s,
                         "unclaimed_seconds": bill.seconds(None),
                         "difference": node_seconds - total_s - bill.seconds(None)},
    }
    publish(report, args.out)


if __name__ == "__main__":
    main()
