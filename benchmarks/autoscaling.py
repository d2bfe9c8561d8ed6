"""The job on a cluster that starts with no worker node: how fast it gets going, what the autoscaler launched and
when, and how the data stages scale with the nodes it adds.

    python benchmarks/autoscaling.py                    # tiny job, 4 experts, 2 cheap nodes at most
    python benchmarks/autoscaling.py --out benchmarks/results_autoscaling.json

Starts the autoscaling local cluster (`ray_cluster.autoscaling`: a head alone, Ray's autoscaler v2 adding the node
groups' simulated nodes), runs `examples/tiny.yaml` with the Ray runner (its corpus cut into shards of
`--rows-per-shard` documents, so the data stages run on Ray Data's autoscaling pools), waits for every worker node to
go, and prints JSON: submission to the first expert's first step, node launches per stage and per round (a launch is
the stage's whose task was running or queued when the autoscaler was asked), peak cheap nodes, the idle node-seconds
before scale-down, and the data stages (prepare, embed, cluster) alone on 1 and on 2 cheap nodes at most, each from
zero nodes: seconds and documents per second.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, publish
from billing import final_lives, wait_for_scale_down

sys.path.insert(0, str(REPO))

DATA_STAGES = ("prepare", "embed", "cluster")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=REPO / "examples" / "tiny.yaml")
    parser.add_argument("--cheap-max", type=int, default=2, help="Most cheap-4090 nodes at once.")
    parser.add_argument("--idle-timeout", type=float, default=20.0, help="Seconds an idle node is kept.")
    parser.add_argument("--rows-per-shard", type=int, default=300, help="data.rows_per_shard of the job.")
    parser.add_argument("--data-docs", type=int, default=3000, help="data.max_documents of the data-only runs.")
    parser.add_argument("--skip-data", action="store_true", help="Only the whole job, not the data-stage runs.")
    parser.add_argument("--out", type=Path, default=None, help="Also write the JSON here.")
    return parser.parse_args()


def cluster_spec(spec, cheap_max: int, idle_timeout: float):
    from ray_cluster.local_cluster import LocalClusterSpec

    return LocalClusterSpec.from_resources(spec.resources, autoscale=True, idle_timeout_s=idle_timeout,
                                           max_nodes={"cheap-4090": cheap_max, "cheap-4090-spot": 0,
                                                      "expensive-a100": 1, "cpu": 1})


def on_cluster(spec, cheap_max: int, idle_timeout: float, run) -> tuple[object, list, float]:
    """`run()` connected to a fresh autoscaling cluster; returns its result, the worker nodes' whole lives and the
    seconds from the job's end until the last worker node went."""
    import ray

    from moedisco.planning.cost import CostLedger
    from ray_cluster.local_cluster import start_local_cluster, stop_local_cluster

    address = start_local_cluster(spec=cluster_spec(spec, cheap_max, idle_timeout))
    try:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
        result = run()
        scale_down_s = wait_for_scale_down(idle_timeout + 120)
        lives = final_lives(CostLedger(Path(spec.output_dir) / "cost.json", spec.resources), spec.resources)
        ray.shutdown()
    finally:
        stop_local_cluster()
    return result, lives, scale_down_s


def stage_windows(events: list[tuple[float, object]]) -> list[tuple[float, float, str]]:
    """(start, end, name) of every task: `stage` or `stage[round r]`, from its stage_started to its stage_finished."""
    opened, windows = {}, []
    for at, event in events:
        name = event.stage if event.round is None else f"{event.stage}[round {event.round}]"
        if event.event == "stage_started":
            opened.setdefault((name, event.expert), at)
        elif event.event == "stage_finished" and (name, event.expert) in opened:
            windows.append((opened.pop((name, event.expert)), at, name))
    return windows + [(start, float("inf"), name) for (name, _), start in opened.items()]


def launches_by_stage(lives: list, windows: list) -> dict[str, dict[str, int]]:
    """Each node's launch given to the latest-started task running when it was asked for."""
    counts: dict[str, dict[str, int]] = {}
    for life in lives:
        asked = life.requested_at or life.started_at
        running = [w for w in windows if w[0] <= asked + 1.0 <= w[1] + 1.0]  # whole seconds on the autoscaler's side
        stage = max(running)[2] if running else "(between tasks)"
        counts.setdefault(stage, {})[life.group] = counts.setdefault(stage, {}).get(life.group, 0) + 1
    return counts


def peak(lives: list, groups: tuple[str, ...], now: float) -> int:
    edges = sorted([(life.started_at, 1) for life in lives if life.group in groups]
                   + [(life.ended_at or now, -1) for life in lives if life.group in groups])
    alive = best = 0
    for _, step in edges:
        alive += step
        best = max(best, alive)
    return best


def idle_before_scale_down(lives: list, uses: list[dict], now: float) -> float:
    """Node-seconds from each node's last use to its end."""
    last = {}
    for use in uses:
        last[use["node"]] = max(last.get(use["node"], 0.0), use["end"] or now)
    return sum(max(0.0, (life.ended_at or now) - last[life.node]) for life in lives if life.node in last)


def whole_job(args) -> dict:
    from moedisco.config.loading import load_spec
    from ray_cluster.orchestrate import run_job_on_ray

    work = Path(tempfile.mkdtemp(prefix="moedisco-autoscaling-"))
    spec = load_spec(args.spec, [f"output_dir={work / 'job'}", f"resources.idle_timeout_s={args.idle_timeout}",
                                 f"data.rows_per_shard={args.rows_per_shard}"])
    events: list = []
    submitted = time.time()
    _, lives, scale_down_s = on_cluster(spec, args.cheap_max, args.idle_timeout,
                                        lambda: run_job_on_ray(spec, events=lambda e: events.append((time.time(), e))))
    done, now = max(at for at, _ in events), time.time()
    first_step = min(at for at, e in events if e.event == "progress" and e.stage == "submodel" and e.step > 0)
    uses = json.loads((Path(spec.output_dir) / "cost.json").read_text())["usage"]["uses"]
    cheap = ("cheap-4090", "cheap-4090-spot")
    return {
        "job_seconds": round(done - submitted, 1),
        "submission_to_first_expert_step_s": round(first_step - submitted, 1),
        "launches_by_stage": launches_by_stage(lives, stage_windows(events)),
        "nodes_launched": len(lives),
        "peak_cheap_nodes": peak(lives, cheap, now),
        "idle_node_seconds_before_scale_down": round(idle_before_scale_down(lives, uses, now), 1),
        "last_worker_gone_after_job_s": round(scale_down_s, 1),
    }


def data_stages_alone(args, cheap_max: int) -> dict:
    """The data stages of the job from zero nodes, stopped once they are done."""
    from moedisco.config.loading import load_spec
    from moedisco.job.layout import JobPaths, is_done
    from moedisco.runner.job_runner import JobCancelled
    from ray_cluster.orchestrate import run_job_on_ray

    work = Path(tempfile.mkdtemp(prefix="moedisco-autoscaling-data-"))
    spec = load_spec(args.spec, [f"output_dir={work / 'job'}", f"resources.idle_timeout_s={args.idle_timeout}",
                                 f"data.rows_per_shard={args.rows_per_shard}", f"data.max_documents={args.data_docs}"])
    paths, events = JobPaths(spec.output_dir), []

    def run():
        try:
            run_job_on_ray(spec, events=lambda e: events.append((time.time(), e)),
                           should_stop=lambda: is_done(paths, "cluster"))
        except JobCancelled:
            pass

    _, lives, _ = on_cluster(spec, cheap_max, args.idle_timeout, run)
    windows = {name: end - start for start, end, name in stage_windows(events) if name in DATA_STAGES}
    documents = json.loads(paths.markers.joinpath("embed.json").read_text())["documents"]
    seconds = sum(windows.values())
    return {"cheap_max": cheap_max, "documents": documents, "seconds_by_stage": {k: round(v, 1) for k, v in
                                                                                  windows.items()},
            "seconds": round(seconds, 1), "documents_per_second": round(documents / seconds, 1),
            "cheap_nodes_launched": sum(1 for life in lives if life.group.startswith("cheap"))}


def main() -> None:
    args = parse_args()
    report = {"date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/autoscaling.py " + " ".join(sys.argv[1:]),
              "cluster": {"cheap_max": args.cheap_max, "a100_max": 1, "cpu_max": 1,
                          "idle_timeout_s": args.idle_timeout, "rows_per_shard": args.rows_per_shard},
              "job": whole_job(args)}
    if not args.skip_data:
        report["data_stages"] = [data_stages_alone(args, cheap_max) for cheap_max in (1, 2)]
    publish(report, args.out)


if __name__ == "__main__":
    main()
