"""The job on a real local Ray cluster: a head, two `gpu_type=4090` nodes and one `gpu_type=A100` node.

One job runs through every property the Ray layer promises, to pay for Ray's process start-ups once:
1. it is cancelled as soon as a submodel trainer reports progress (the trainers must stop, finished stages stay);
2. it is run again, as after a dead driver: finished stages are skipped, the interrupted experts resume, and one
   training worker is SIGKILLed mid-stage (Ray Train must restart it from its last checkpoint);
3. the same spec runs in process with the local runner, for the comparison.

The tiny corpus fits one shard, so the job runs its data stages in one `DataWorker` process; Ray Data's path (a
sampled fit, the rest assigned in one pass) is run on the same prepared data too, and both must give the local
runner's clusters.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import numpy as np
import pyarrow.dataset as pads
import pytest
import ray

from moedisco.config.loading import build_spec
from moedisco.io.documents import load_texts
from moedisco.io.token_shards import TokenShard
from moedisco.job.events import JobCancelledEvent, NodeUse
from moedisco.job.layout import JobPaths, stage_result
from moedisco.job.metrics import MetricsWriter, read_metrics
from moedisco.job.registry import STAGE, Task, plan
from moedisco.models.architecture import read_config
from moedisco.models.experts import expert_provenance
from moedisco.runner.job_runner import JobCancelled, JobRunner, LocalExecutor
from moedisco.stages.cluster import ClusterResult, fit_streaming
from moedisco.stages.embed import Embedder
from moedisco.stages.prepare import stage_prepare
from moedisco.stages.stage_run import StageRun
from ray_cluster.data import embed_cluster, prepare
from ray_cluster.local_cluster import (
    SIMULATED_LABEL,
    LocalClusterSpec,
    describe_nodes,
    free_port,
)
from ray_cluster.node_uses import NodeUseReporter
from ray_cluster.orchestrate import run_job_on_ray
from ray_cluster.placement import job_storage, on_driver_node, placement_tier
from ray_cluster.tracking import EventQueue
from ray_cluster.worker import POINTER_FILE
from tests.conftest import CORPUS, tiny_spec_dict
from tests.helpers import add_local_node, connected_cluster

pytestmark = pytest.mark.slow

# 40 steps give the driver time to act between a trainer's first progress report and its end.
TRAIN = {"steps": 40, "checkpoint_every": 4, "eval_every": 4}
ONE_ROUND = {"sync_rounds": 1}
TRAINER_ACTORS = ("RayTrainWorker", "TrainController", "TrainerLauncher", "DataWorker")


@pytest.fixture(scope="module")
def ray_cluster():
    # Ray's default dashboard port may belong to another cluster on this machine. Ray Train's preemption watcher
    # polls node drains every 5 s by default; its processes inherit this, so the spot test need not wait.
    os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")
    with connected_cluster(LocalClusterSpec(num_cheap=2, num_expensive=1, dashboard_port=free_port())) as address:
        yield address


def alive_trainer_actors() -> list[str]:
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address  # never auto-detect: other clusters may run on this machine
    actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000,
                         raise_on_missing_output=False)
    return [a.class_name for a in actors if any(name in a.class_name for name in TRAINER_ACTORS)]


def wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


def cancelled_run(spec) -> dict:
    events = []

    def first_submodel_progress() -> bool:
        return any(e.event == "progress" and e.stage == "submodel" and e.step > 0 for e in events)

    with pytest.raises(JobCancelled):
        run_job_on_ray(spec, events=events.append, should_stop=first_submodel_progress)
    stopped = wait_until(lambda: not alive_trainer_actors(), timeout_s=60)
    return {"events": events, "trainers_stopped": stopped, "alive": alive_trainer_actors()}


def kill_running_task(name: str, killed: dict) -> None:
    """SIGKILL the worker of the first running Ray task called `name`, as a lost node would end it."""
    from ray.util.state import list_tasks

    address = ray.get_runtime_context().gcs_address
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        running = list_tasks(address=address, filters=[("name", "=", name), ("state", "=", "RUNNING")],
                             raise_on_missing_output=False)
        pids = [task.worker_pid for task in running if task.worker_pid]
        if pids:
            killed["merge_pid"] = pids[0]
            os.kill(pids[0], signal.SIGKILL)
            return
        time.sleep(0.1)


def resumed_run_with_a_killed_worker(spec) -> dict:
    """Resume the cancelled job, killing one submodel worker mid-training and the merge task's worker once."""
    events, killed = [], {}

    def kill_first_worker(event) -> None:
        events.append(event)
        if (not killed and event.event == "progress" and event.stage == "submodel"
                and 0 < event.step < event.total_steps):
            killed.update(expert=event.expert, step=event.step, pid=event.pid)
            os.kill(event.pid, signal.SIGKILL)
        if event.event == "stage_started" and event.stage == "merge":
            threading.Thread(target=kill_running_task, args=("run_stage_on_tier", killed), daemon=True).start()

    started = time.perf_counter()
    summary = run_job_on_ray(spec, events=kill_first_worker)
    return {"events": events, "killed": killed, "summary": summary, "seconds": time.perf_counter() - started}


def local_submodels(spec) -> JobPaths:
    """The local runner's stages up to the submodels, in process (merge and fine-tune are not compared)."""
    runner = JobRunner(spec, LocalExecutor(progress=False))
    runner.executor.open(runner.job)
    try:
        for group in runner.plan:
            if group[0].stage == "merge":
                break
            runner.run_group(group)
    finally:
        runner.executor.close()  # its SIGTERM handler goes back while still on the main thread
    return runner.paths


@pytest.fixture(scope="module")
def job(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    # One round: this job is about one trainer's preemption and resume (`test_sync_rounds_...` covers rounds).
    spec = build_spec(tiny_spec_dict(root / "ray", submodel=TRAIN, branch=ONE_ROUND))
    started_at = time.time()
    cancelled = cancelled_run(spec)
    resumed = resumed_run_with_a_killed_worker(spec)
    finished_at = time.time()
    local_spec = build_spec(tiny_spec_dict(root / "local", submodel=TRAIN, branch=ONE_ROUND))
    return {"spec": spec, "paths": JobPaths(spec.output_dir), "cancelled": cancelled, "resumed": resumed,
            "local": local_submodels(local_spec), "nodes": describe_nodes(), "run_time": (started_at, finished_at)}


def submodel_summaries(job) -> dict[int, dict]:
    return {k: stage_result(job["paths"], f"submodel_{k}") for k in range(job["spec"].model.num_experts)}


def test_cluster_has_labelled_tiers(job):
    labels = sorted(n["labels"]["gpu_type"] for n in job["nodes"])
    assert labels == ["4090", "4090", "A100", "cpu", "head"]


def test_cancel_stops_trainers_and_keeps_finished_stages(job):
    cancelled = job["cancelled"]
    assert cancelled["trainers_stopped"], f"still alive after cancel: {cancelled['alive']}"
    assert JobCancelledEvent() in cancelled["events"]
    assert {"expert_state"} <= {e.event for e in cancelled["events"]}
    states = {e.state for e in cancelled["events"] if e.event == "expert_state"}
    assert "cancelled" in states
    # The rerun skipped every stage finished before the cancel instead of redoing it.
    skipped = {e.stage for e in job["resumed"]["events"] if e.event == "stage_skipped"}
    assert {"prepare", "embed", "cluster", "source"} <= skipped


def test_interrupted_experts_resume_from_their_checkpoints(job):
    interrupted = {e.expert for e in job["cancelled"]["events"]
                   if e.event == "progress" and e.stage == "submodel" and e.step > 0}
    summaries = submodel_summaries(job)
    assert interrupted and all(summaries[k]["resumed_from"] > 0 for k in interrupted
                               if k != job["resumed"]["killed"]["expert"])


def test_killed_worker_restarts_from_its_last_checkpoint(job):
    killed = job["resumed"]["killed"]
    assert killed, "no submodel progress was seen to kill a worker on"
    expert = killed["expert"]
    summary = submodel_summaries(job)[expert]
    assert summary["steps"] == TRAIN["steps"] and summary["pid"] != killed["pid"]
    attempts = [e.attempt for e in job["resumed"]["events"]
                if e.event == "expert_state" and e.expert == expert and e.state == "running"]
    assert max(attempts) >= 2, "Ray Train did not restart the killed worker group"
    # Everything the killed worker logged was at most one checkpoint interval ahead of where it resumed.
    before_kill = [r["step"] for r in read_metrics(job["paths"].metrics, "submodel")
                   if r["expert"] == expert and r["pid"] == killed["pid"]]
    assert max(before_kill) - summary["resumed_from"] <= TRAIN["checkpoint_every"]
    # The ledger prices what the restart trained twice: from the checkpoint to the furthest step the driver saw.
    cost = json.loads(job["paths"].cost.read_text())
    row = next(r for r in cost["stages"] if r["stage"] == "submodel" and r["expert"] == expert)
    assert killed["step"] - summary["resumed_from"] <= row["lost_steps"] <= max(before_kill) - summary["resumed_from"]
    assert row["preemptions"] == 0 and (row["lost_usd"] > 0) == (row["lost_steps"] > 0)
    steps = [r["step"] for r in read_metrics(job["paths"].metrics, "submodel") if r["expert"] == expert]
    assert steps[-1] == TRAIN["steps"]


def node_uses(events: list) -> dict[tuple, NodeUse]:
    """The last word on each use the events reported, by `use_id`."""
    return {event.use_id: event for event in events if event.event == "node_use"}


def test_every_stage_lists_the_node_time_its_workers_held(job):
    """The billed cost's input: each stage's summary lists its node uses, on alive nodes of its tier, closed, within
    the job's run; a trainer's hold a GPU; the killed worker's use was closed by the driver; the events carried the
    same uses as they came, and left none open."""
    spec, (started_at, finished_at) = job["spec"], job["run_time"]
    tier_of_node = {node["node_id"]: node["labels"]["gpu_type"] for node in job["nodes"]}
    for task in (task for group in plan(spec) for task in group):
        uses = [NodeUse(**use) for use in stage_result(job["paths"], task.marker)["node_uses"]]
        assert uses, task.marker
        # The tiny corpus is one shard: its data stages run in the job's data worker, on a cheap node; the source
        # model is built on the CPU tier.
        in_worker = STAGE[task.stage].setup and task.stage != "source"
        tier = spec.resources.submodel_tier if in_worker else placement_tier(spec, task.stage)
        for use in uses:
            assert tier_of_node.get(use.node) == tier.label, (task.marker, use)
            assert started_at <= use.start < use.end <= finished_at, (task.marker, use)
            assert (use.stage, use.expert, use.round) == (task.stage, task.expert, task.round)
            assert not STAGE[task.stage].trained or use.resources.get("GPU", 0) > 0, (task.marker, use)
    killed = job["resumed"]["killed"]
    summary = submodel_summaries(job)[killed["expert"]]
    assert killed["pid"] in {use["pid"] for use in summary["node_uses"]}
    for run in (job["cancelled"], job["resumed"]):
        reported = node_uses(run["events"])
        assert all(use.end is not None for use in reported.values()), "a use left open"
        for finished in (e for e in run["events"] if e.event == "stage_finished"):
            listed = {NodeUse(**use).use_id for use in finished.summary["node_uses"]}
            assert listed == {use_id for use_id, use in reported.items()
                              if (use.stage, use.expert) == (finished.stage, finished.expert)}, finished.stage


def test_the_ledger_bills_the_worker_nodes_the_job_held_and_never_the_head(job):
    """cost.json's billed view: from the nodes' lives (the static cluster's nodes were there before the job, so no
    boot is the job's) and its uses; every billed node is a worker node of the cluster; simulated; beside compute."""
    cost = json.loads(job["paths"].cost.read_text())
    billed, workers = cost["billed"], {node["node_id"] for node in job["nodes"] if node["labels"]["gpu_type"] != "head"}
    assert billed["basis"] == "nodes" and billed["simulated"] and billed["total_usd"] > 0
    assert {node for row in billed["rows"] for node in row["nodes"]} <= workers
    assert billed["seconds_by_kind"]["boot"] == 0 and billed["seconds_by_kind"]["busy"] > 0
    # By tier label and market; the source model was built on the CPU node.
    assert {row["group"] for row in billed["rows"]} == {"cheap-4090", "expensive-a100", "cpu"}
    assert cost["total_usd"] > 0  # the compute view beside it


def test_ray_train_holds_pointers_to_checkpoints_already_on_its_storage(job):
    """moedisco's checkpoints lie in the job folder, which is Ray's storage here: no second copy of them."""
    runs = [job_storage(job["spec"]) / f"submodel_{k}" for k in range(job["spec"].model.num_experts)]
    reported = [path for run in runs for path in run.rglob("*") if path.is_file() and "checkpoint_" in str(path)]
    assert any(path.name == POINTER_FILE for path in reported), [str(p) for p in reported]
    assert all(path.stat().st_size < 4096 for path in reported), [p for p in reported if p.stat().st_size >= 4096]


def test_a_stage_outside_ray_train_reruns_after_its_worker_is_lost(job):
    """The merge is a plain Ray task: killing its worker process (a lost node) re-runs it, and the job ends."""
    assert job["resumed"]["killed"].get("merge_pid"), "the merge task was never seen running"
    assert stage_result(job["paths"], "merge")["eval_loss"] > 0
    assert (job["paths"].final / "config.json").is_file()


def test_every_expert_completes_at_most_two_at_a_time(job):
    summaries = submodel_summaries(job)
    assert all(s["steps"] == TRAIN["steps"] for s in summaries.values())
    intervals = [(s["started_at"], s["finished_at"]) for s in summaries.values()]
    overlap = max(sum(start <= t < end for start, end in intervals) for t, _ in intervals)
    assert overlap <= 2
    states = [e.state for e in job["resumed"]["events"] if e.event == "expert_state"
              and e.stage == "submodel"]
    assert {"waiting", "running", "done"} <= set(states)


def test_tiers_read_back_from_metrics(job):
    records = read_metrics(job["paths"].metrics)
    submodel = {r["gpu_type"] for r in records if r["stage"] == "submodel"}
    finetune = {r["gpu_type"] for r in records if r["stage"] == "finetune"}
    assert submodel == {"4090"} and finetune == {"A100"}
    cheap_nodes = {n["node_id"] for n in job["nodes"] if n["labels"]["gpu_type"] == "4090"}
    assert {r["node"] for r in records if r["stage"] == "submodel"} <= cheap_nodes


def test_cost_ledger_records_tier_nodes_and_time(job):
    cost = json.loads(job["paths"].cost.read_text())
    rows = {(r["stage"], r["expert"]): r for r in cost["stages"]}
    assert rows[("finetune", None)]["tier"] == "A100" and rows[("finetune", None)]["num_devices"] == 1
    assert all(rows[("submodel", k)]["tier"] == "4090" and rows[("submodel", k)]["node"] for k in range(4))
    assert rows[("embed", None)]["num_devices"] >= 1 and rows[("merge", None)]["tier"] == "4090"
    assert job["resumed"]["summary"]["cost"]["total_usd"] == pytest.approx(cost["total_usd"])


def test_ray_and_local_runner_agree(job):
    ray_clusters, local_clusters = (ClusterResult.load(p.clusters) for p in (job["paths"], job["local"]))
    np.testing.assert_array_equal(ray_clusters.assignments, local_clusters.assignments)
    assert ray_clusters.inertia == pytest.approx(local_clusters.inertia, rel=1e-6)
    for expert in range(job["spec"].model.num_experts):
        ray_loss = stage_result(job["paths"], f"submodel_{expert}")["eval_loss"]
        local_loss = stage_result(job["local"], f"submodel_{expert}")["eval_loss"]
        assert ray_loss == pytest.approx(local_loss, abs=0.02), f"expert {expert}"


def test_outputs_and_shards(job):
    assert (job["paths"].final / "config.json").is_file()
    written = {p.name for p in job_storage(job["spec"]).iterdir()}
    assert {"corpus", "embeddings"} <= written and "clusters" not in written  # no per-cluster copy of the texts


def test_ray_data_gives_the_local_runners_split_tokens_and_clusters(job, tmp_path_factory):
    """A corpus of three files on Ray Data, in shards of 64 documents: prepare gives the local runner's split and
    tokens; with a fit capped at 100 documents, embed embeds those alone, cluster the rest in one pass, and the
    clusters are the local runner's sampled fit's (`fit_streaming`); a re-run resumes from the pass's saved rows."""
    embed_records = read_metrics(job["paths"].metrics, "embed")
    assert embed_records and all(r["num_nodes"] == 1 for r in embed_records)  # one DataWorker, no actor pool
    root = tmp_path_factory.mktemp("ray-data")
    (root / "corpus").mkdir()
    lines = CORPUS.read_text().splitlines(keepends=True)[:600]
    for part in range(3):
        (root / "corpus" / f"part-{part}.jsonl").write_text("".join(lines[part * 200 : (part + 1) * 200]))
    specs = [build_spec(tiny_spec_dict(root / name, submodel=TRAIN, branch=ONE_ROUND,
                                       data={"train": str(root / "corpus"), "max_documents": None,
                                             "rows_per_shard": 64}))
             for name in ("ray", "local")]
    (spec, paths), local_paths, cap = (specs[0], JobPaths(specs[0].output_dir)), JobPaths(specs[1].output_dir), 100
    stage_prepare(StageRun(specs[1], local_paths, MetricsWriter(local_paths.metrics), Task("prepare"), progress=False))
    where = on_driver_node()
    queue = EventQueue.options(**where).remote()
    reporters = {stage: NodeUseReporter(queue, {"stage": stage}) for stage in ("prepare", "embed", "cluster")}
    prepared = ray.get(ray.remote(prepare.prepare_stage).options(**where).remote(spec, paths, 2, reporters["prepare"]))
    assert prepared["split_tasks"] == 3 and prepared["tokenized_on_ray_data"] == prepared["train_documents"]
    for name in ("train", "eval"):
        assert paths.texts(name).read_bytes() == local_paths.texts(name).read_bytes()
        ray_data, one_process = (TokenShard.load(p.tokens(name)) for p in (paths, local_paths))
        np.testing.assert_array_equal(ray_data.offsets, one_process.offsets)
        np.testing.assert_array_equal(ray_data.tokens, one_process.tokens)
    embedded = ray.get(ray.remote(embed_cluster.embed_stage).options(**where).remote(spec, paths, 2, cap,
                                                                                     reporters["embed"]))
    clustered = ray.get(ray.remote(embed_cluster.cluster_stage).options(**where).remote(spec, paths, 2,
                                                                                        reporters["cluster"]))
    assert_pools_and_tasks_reported_their_nodes(ray.get(queue.drain.remote()), job["nodes"])
    ray.kill(queue)
    embedded_rows = pads.dataset(str(job_storage(spec) / "embeddings"), format="parquet").count_rows()  # from the footers
    assert embedded["documents"] == cap == embedded_rows
    assert clustered["fit_documents"] == cap and "assign_seconds" in clustered
    vectors_ND = Embedder(spec.embed)(load_texts(paths.texts("train")))
    local = fit_streaming(vectors_ND, spec.cluster, spec.model.num_experts, spec.seed, max_fit_documents=cap)
    ray_data = ClusterResult.load(paths.clusters)
    assert len(ray_data.assignments) == embedded["corpus_documents"] > cap
    np.testing.assert_array_equal(ray_data.assignments, local.assignments)
    np.testing.assert_allclose(ray_data.centroids, local.centroids, rtol=1e-6)
    assert ray_data.inertia == pytest.approx(local.inertia, rel=1e-6)
    # As after an interruption half-way: the saved rows are not embedded again, the rest are.
    saved = sorted((job_storage(spec) / "assigned").glob("fit-*.parquet"))
    assert len(saved) > 2 and all(p.unlink() is None for p in saved[::2])
    again = ray.get(ray.remote(embed_cluster.cluster_stage).options(**where).remote(spec, paths, 2))
    assert 0 < again["resumed_documents"] < embedded["corpus_documents"] - cap
    np.testing.assert_array_equal(ClusterResult.load(paths.clusters).assignments, local.assignments)


def assert_pools_and_tasks_reported_their_nodes(events: list, nodes: list[dict]) -> None:
    """Each stage's Ray Data actors (tokenize, embed, assign) said as they started that they hold a node of the
    stage's tier (the driver closes their uses): the CPU node for prepare's, a cheap node for the others; and its
    tasks (the split's, the one-CPU one, the fit) said so as they started and as they ended."""
    tier_nodes = {tier: {node["node_id"] for node in nodes if node["labels"]["gpu_type"] == tier}
                  for tier in ("4090", "cpu")}
    last = node_uses(events)
    for stage, tier in (("prepare", "cpu"), ("embed", "4090"), ("cluster", "4090")):
        actors = [use for use in last.values() if use.stage == stage and use.end is None]
        assert actors and {use.node for use in actors} <= tier_nodes[tier], stage
        assert all(use.resources.get("CPU") == 1 for use in actors), actors
    tasks = [use for use in last.values() if use.end is not None]
    assert {use.stage for use in tasks} == {"prepare", "cluster"} and all(use.start < use.end for use in tasks)
    assert {use.node for use in tasks if use.stage == "prepare"} <= tier_nodes["cpu"]  # split and one-CPU task
    assert {use.node for use in tasks if use.stage == "cluster"} <= tier_nodes["4090"]  # the fit, on the cheap tier


def test_single_worker_trainers_go_without_a_process_group(ray_cluster, tiny_spec_factory):
    """A TorchTrainer only adds a torch.distributed group; one worker never uses it, and it costs seconds."""
    from ray.train.torch import TorchTrainer

    from ray_cluster.trainers import build_trainer

    alone = build_trainer(tiny_spec_factory(), Task("submodel", 0))
    data_parallel = build_trainer(tiny_spec_factory(resources={"workers_per_expert": 2}), Task("submodel", 0))
    assert not isinstance(alone, TorchTrainer) and isinstance(data_parallel, TorchTrainer)


def test_sync_rounds_with_data_parallel_submodels_match_the_local_runner(ray_cluster, tmp_path_factory):
    """Two rounds, each expert trained by two data-parallel workers (one per cheap node), against one process."""
    root = tmp_path_factory.mktemp("rounds")
    sections = {"branch": {"sync_rounds": 2}, "model": {"num_experts": 2, "num_experts_per_tok": 1},
                "submodel": {"steps": 8, "checkpoint_every": 4, "eval_every": 4}}
    spec = build_spec(tiny_spec_dict(root / "ray", **sections, resources={"workers_per_expert": 2}))
    events = []
    trained = lambda: all((spec.output_dir / "stages" / f"submodel_{k}.json").is_file() for k in (0, 1))
    with pytest.raises(JobCancelled):  # stopped before the merge: the rounds are what this test is about
        run_job_on_ray(spec, events=events.append, should_stop=trained)
    local = build_spec(tiny_spec_dict(root / "local", **sections))
    local_submodels(local)
    finished = [(e.stage, e.expert, e.round) for e in events if e.event == "stage_finished"
                and e.stage in ("submodel", "sync")]
    assert finished == [("submodel", 0, 0), ("submodel", 1, 0), ("sync", None, 0), ("submodel", 0, 1),
                        ("submodel", 1, 1)]
    # Each round is a Ray Train run of its own, so a restarted worker never restores an unsynced checkpoint; a
    # round's run is deleted once its sync is done.
    runs = {p.name for p in job_storage(spec).iterdir()}
    assert {"submodel_0", "submodel_1"} <= runs and not {"submodel_0_round_0", "submodel_1_round_0"} & runs
    for expert in (0, 1):
        on_ray, in_process = (stage_result(JobPaths(s.output_dir), f"submodel_{expert}") for s in (spec, local))
        assert on_ray["resumed_from"] == 4 and on_ray["gpu_type"] == "4090" and on_ray["num_nodes"] == 2
        assert on_ray["eval_loss"] == pytest.approx(in_process["eval_loss"], abs=0.02), f"expert {expert}"
    rows = {(r["stage"], r["expert"]): r for r in json.loads(JobPaths(spec.output_dir).cost.read_text())["stages"]}
    assert all(set(rows[("submodel", k)]["rounds"]) == {"0", "1"} and rows[("submodel", k)]["num_devices"] == 2
               for k in (0, 1))
    assert rows[("sync", None)]["tier"] == "4090"


def drain_as_preemption(node_id: str) -> None:
    """What KubeRay's preStop hook (`ray drain-node`) or a cloud's notice does: the node is to go in 2 minutes."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    accepted, why = GcsClient(address=ray.get_runtime_context().gcs_address).drain_node(
        node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), "spot node reclaimed",
        int(time.time() * 1000) + 120_000)
    assert accepted, why


def test_a_preempted_expert_checkpoints_on_notice_and_only_it_starts_again(job, tmp_path):
    """Expert 0's spot node is drained mid-training: Ray Train's preemption watcher, fast for nodes labelled
    market=spot without a `spot` flag, tells the worker, which checkpoints the step it reached; only it starts again,
    on the replacement node, from that step, with no failure budget (`max_failures: 0`) to spend."""
    out, source = tmp_path / "spot", job["paths"].root
    # Ray's own files of the other job (its Ray Train runs point at its folder) stay behind.
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("merged", "final", "runs", "metrics.jsonl",
                                                               job_storage(job["spec"]).name))
    shutil.rmtree(out / "submodels" / "0")  # expert 0 trains again; the others and the data stages stay done
    for marker in ("submodel_0", "merge", "finetune"):
        (out / "stages" / f"{marker}.json").unlink()
    spec = build_spec(tiny_spec_dict(out, submodel={"steps": 300, "checkpoint_every": 1000, "eval_every": 25},
                                     branch=ONE_ROUND, resources={"max_failures": 0, "submodel_tier": {
                                         "label": "spot", "device_type": "rtx4090"}}))
    spot = {"gpu_type": "spot", "market": "spot", **dict([SIMULATED_LABEL])}
    nodes, events = [add_local_node(spot)], []

    def drain_on_first_progress(event) -> None:
        events.append(event)
        if event.event == "progress" and event.stage == "submodel" and event.step > 0 and len(nodes) == 1:
            nodes.append(add_local_node(spot))  # the replacement pod the autoscaler would add
            drain_as_preemption(event.node)

    with pytest.raises(JobCancelled):  # stop before the merge: the submodel is what this test is about
        run_job_on_ray(spec, events=drain_on_first_progress,
                       should_stop=lambda: (out / "stages" / "submodel_0.json").is_file())
    (step,) = [e.step for e in events if e.event == "expert_state" and e.state == "preempted"]
    summary = stage_result(JobPaths(out), "submodel_0")
    assert 0 < step < 300 and summary["steps"] == 300 and summary["node"] == nodes[1]
    assert summary["resumed_from"] == step and summary["preemptions"] == 1 and summary["lost_steps"] == 0
    first = [r for r in read_metrics(out / "metrics.jsonl", "submodel") if r["node"] == nodes[0]]
    assert first and max(r["step"] for r in first) <= step  # nothing it trained is trained again
    assert {e.expert for e in events if e.event == "expert_state"} == {0}  # the others stayed done
    row = next(r for r in json.loads((out / "cost.json").read_text())["stages"]
               if r["stage"] == "submodel" and r["expert"] == 0)
    assert row["preemptions"] == 1 and row["lost_steps"] == 0 and row["lost_usd"] == 0.0


def test_an_extension_and_a_retirement_run_on_the_cluster(job, tmp_path):
    """`method: extend` on the finished Ray job: its new submodel and fine-tune on their tiers, the source and
    merge as tasks; then `method: retire` takes the new expert out again."""
    new = tmp_path / "new.jsonl"
    code = [line for line in CORPUS.read_text().splitlines() if json.loads(line)["domain"] == "code"]
    new.write_text("\n".join(code[:120]) + "\n")
    spec = build_spec({**tiny_spec_dict(tmp_path / "extended", data={"train": str(new)},
                                        submodel={"steps": 8, "checkpoint_every": 4}, finetune={"steps": 4}),
                       "method": "extend", "extend": {"base": str(job["paths"].root)}})
    summary = run_job_on_ray(spec)
    rows = {(r["stage"], r["expert"]): r for r in summary["cost"]["stages"]}
    assert rows[("submodel", 0)]["tier"] == "4090" and rows[("finetune", None)]["tier"] == "A100"
    assert ("embed", None) not in rows and ("submodel", 1) not in rows  # one new cluster: nothing to embed
    extended = read_config(tmp_path / "extended" / "final")
    assert extended.num_experts == 5 and expert_provenance(extended)[4]["job"] == "test"
    retired = build_spec({"name": "retired", "output_dir": str(tmp_path / "retired"), "method": "retire",
                          "retire": {"base": str(tmp_path / "extended"), "experts": [4]}})
    run_job_on_ray(retired)
    assert read_config(tmp_path / "retired" / "final").num_experts == 4
