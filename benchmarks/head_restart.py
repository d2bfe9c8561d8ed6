"""What a head restart costs a running job on a cluster with GCS fault tolerance: seconds lost and steps redone.

    python benchmarks/head_restart.py                   # Ray runner, 2 experts of 40 steps; 2 pairs of jobs
    python benchmarks/head_restart.py --out benchmarks/results_head_restart.json

Starts a Redis (service/scripts/start_redis.sh) and the static local cluster with GCS fault tolerance
(`LocalClusterSpec.redis_address`): a head, two cheap nodes, an A100 node and a CPU node. Each job is launched as the
service's dispatcher does (`RayLauncher`, its job actor on the CPU node's driver slot) on a SQLite store. The
baseline job runs undisturbed; the other has its head killed (SIGKILL of the GCS, raylet, dashboard and monitor,
`ray_cluster.local_cluster.kill_head`) once its experts are past `--kill-at-step`, and started again after
`--down-s` seconds on the same GCS port and Redis; `--repeats` such pairs. Prints JSON: each job's wall time and the
longest pause between two of its logged steps, the time lost (each pair's difference), how long the head was
away, each expert's stage starts and steps redone (`lost_steps` in its summary), and the runner's attempts.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _common import REPO, publish

sys.path.insert(0, str(REPO))

START_REDIS = REPO / "service" / "scripts" / "start_redis.sh"
NAMESPACE = "moedisco-head-restart"
TERMINAL = ("succeeded", "failed", "cancelled")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="submodel.steps of each expert.")
    parser.add_argument("--kill-at-step", type=int, default=12, help="Kill the head once an expert logged this step.")
    parser.add_argument("--down-s", type=float, default=5.0, help="Seconds the head stays down.")
    parser.add_argument("--repeats", type=int, default=2, help="Pairs of jobs: one undisturbed, one restarted.")
    parser.add_argument("--out", type=Path, default=None, help="Also write the JSON here.")
    return parser.parse_args()


def job_spec(output_dir: Path, steps: int) -> dict:
    from tests.conftest import tiny_spec_dict

    return tiny_spec_dict(output_dir, name="restart", method="moe_disco",
                          model={"num_experts": 2, "num_experts_per_tok": 1},
                          submodel={"steps": steps, "checkpoint_every": 4, "eval_every": 4}, branch={"sync_rounds": 1})


def launch(address: str, store, settings, spec: dict) -> tuple[str, dict]:
    """Queue the job and launch its runner as the dispatcher does; returns its id and where the actor runs."""
    import ray
    from ray.util.state import list_actors

    from ray_cluster.local_cluster import describe_nodes
    from service.jobs.dispatcher import RayLauncher

    job = store.create_job(f"{int(time.time() * 1e6) % 10**12:012d}", spec, runner="ray")
    store.claim_next_queued()
    store.begin_attempt(job.id)
    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    try:
        RayLauncher(settings).launch(job.id, "ray")
        # The launch's `run` call is sent once the actor is up: this driver stays until the runner holds the job.
        wait_for(lambda: store.get_job(job.id).runner_id, 300, "the runner's lease")
        alive = list_actors(address=address, filters=[("name", "=", f"job-{job.id}"), ("state", "=", "ALIVE")],
                            raise_on_missing_output=False)
        labels = {node["node_id"]: node["labels"] for node in describe_nodes()}
        where = labels.get(alive[0].node_id, {}) if alive else {}
    finally:
        ray.shutdown()  # this process's driver sits on the head: it must not be connected when the head dies
    return job.id, where


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(0.25)
    return value


def expert_past(store, job_id: str, step: int) -> bool:
    return any(stage.stage == "submodel" and stage.state == "running" and (stage.step or 0) >= step
               for stage in store.stages(job_id))


def outcome(store, job_id: str, started: float) -> dict:
    """The job's end as the store has it: wall time, attempts, and per expert how often its stage started, the
    steps its trainers redid (`lost_steps`) and ran; the longest pause between two logged steps of the job."""
    job = wait_for(lambda: (row := store.get_job(job_id)).state in TERMINAL and row, 900, f"job {job_id} ends")
    seconds = time.time() - started  # polled every 0.25 s
    starts = Counter(event.expert for event in store.events(job_id, "stage_started") if event.stage == "submodel")
    experts = {stage.expert: {"stage_starts": starts[stage.expert], **{key: (stage.summary or {}).get(key)
                                                                          for key in ("lost_steps", "steps_run")}}
               for stage in store.stages(job_id) if stage.stage == "submodel"}
    steps = sorted(event.time for event in store.events(job_id, "progress"))
    return {"state": job.state, "reason": job.reason, "attempts": job.attempts, "seconds": round(seconds, 1),
            "longest_step_gap_s": round(max((b - a).total_seconds() for a, b in zip(steps, steps[1:])), 1),
            "experts": experts}


def run_job(address: str, store, settings, output_dir: Path, args, restart: bool) -> dict:
    """One job to its end; with `restart`, the head killed once an expert is past `--kill-at-step`, and started
    again `--down-s` seconds later."""
    from ray_cluster.local_cluster import kill_head, start_head

    started = time.time()
    job_id, driver_labels = launch(address, store, settings, job_spec(output_dir, args.steps))
    head = {}
    if restart:
        wait_for(lambda: expert_past(store, job_id, args.kill_at_step), 600, "an expert under way")
        killed_at = time.time()
        head["processes_killed"] = len(kill_head())
        time.sleep(args.down_s)
        start_head()
        head["head_away_s"] = round(time.time() - killed_at, 1)
    return {**outcome(store, job_id, started), "driver_node_labels": driver_labels, **head}


def main() -> None:
    args = parse_args()
    from ray_cluster.local_cluster import LocalClusterSpec, free_port, start_local_cluster, stop_local_cluster
    from service.core.config import Settings
    from service.store.store import Store
    from tests.conftest import CORPUS

    redis = subprocess.run(["bash", str(START_REDIS)], check=True, capture_output=True, text=True).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="moedisco-head-restart-"))
    url = f"sqlite:///{work / 'moedisco.db'}"
    settings = Settings(data_dir=work, database_url=url, runner="ray", input_roots=[CORPUS.parent],
                        ray_namespace=NAMESPACE)
    store = Store(url)
    try:
        spec = LocalClusterSpec(num_cheap=2, num_expensive=1, redis_address=redis, dashboard_port=free_port())
        address = start_local_cluster(spec=spec)
        pairs = [{name: run_job(address, store, settings, work / f"{name}-{index}", args, name == "head_restart")
                  for name in ("baseline", "head_restart")} for index in range(args.repeats)]
    finally:
        store.close()
        stop_local_cluster()
        subprocess.run(["bash", str(START_REDIS), "--stop", redis], check=False)
    lost = [pair["head_restart"]["seconds"] - pair["baseline"]["seconds"] for pair in pairs]
    result = {"cluster": "static local, GCS fault tolerance on Redis: head, 2 cheap, 1 A100, 1 CPU node",
              "runner": "ray", "experts": 2, "steps": args.steps, "kill_at_step": args.kill_at_step,
              "down_s": args.down_s, "pairs": pairs,
              "seconds_lost": [round(x, 1) for x in lost], "seconds_lost_mean": round(statistics.mean(lost), 1),
              "steps_redone": sum(expert["lost_steps"] or 0 for pair in pairs
                                  for expert in pair["head_restart"]["experts"].values()),
              "runner_attempts": [pair["head_restart"]["attempts"] for pair in pairs]}
    publish(result, args.out)


if __name__ == "__main__":
    main()
