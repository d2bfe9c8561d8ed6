"""A whole job on the autoscaling local cluster, from a head alone: Ray's autoscaler v2 adds the node groups' nodes as
the job's stages ask for their labels and removes them once idle (`ray_cluster.autoscaling`), as on KubeRay.

One cluster and one job for the module (each simulated node is a raylet and its agents): at most two cheap nodes, one
A100 node and one CPU node, an idle timeout of a few seconds. The job's corpus is cut into several shards, so its data
stages run on Ray Data's autoscaling actor pools rather than in one process, and it has two synchronisation rounds.
What it must show: two experts training at once, each trainer on one GPU of its tier, the A100 node only for the
fine-tune, the data pools on as many nodes as the groups allow, no node launched between the two rounds (their
nodes are held through the sync), no work on the head and the service's job actor on a CPU node, a 30 s capacity
deadline not tripped by queued experts and launching nodes, a group that may not grow failing within the deadline,
and no worker node left after the jobs.

    pytest tests/test_autoscaling_job.py -q
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

import pytest
import ray
from ray.util.state import list_actors, list_tasks

from moedisco.config.loading import build_spec
from moedisco.job.layout import JobPaths
from moedisco.job.metrics import read_metrics
from ray_cluster.local_cluster import (
    CONTROL_PLANE_LABEL,
    LocalClusterSpec,
    free_port,
)
from ray_cluster.metering import read_node_lives
from ray_cluster.orchestrate import run_job_on_ray
from ray_cluster.placement import prepare_worker, task_options
from service.api.routes.cluster import cluster as cluster_view
from service.jobs.dispatcher import job_actor_placement
from service.jobs.executor import JobActor
from tests.conftest import tiny_spec_dict
from tests.helpers import connected_cluster, wait_until

pytestmark = pytest.mark.slow

IDLE_TIMEOUT_S = 6
MAX_NODES = {"cheap-4090": 2, "cheap-4090-spot": 0, "expensive-a100": 1, "cpu": 1}
CHEAP_GROUPS = ("cheap-4090", "cheap-4090-spot")


@pytest.fixture(scope="module")
def cluster():
    with connected_cluster(LocalClusterSpec(autoscale=True, max_nodes=MAX_NODES, idle_timeout_s=IDLE_TIMEOUT_S,
                                            dashboard_port=free_port())) as address:
        yield address


@pytest.fixture(scope="module")
def job(cluster, tmp_path_factory) -> dict:
    head = ray.get_runtime_context().get_node_id()
    assert [node["NodeID"] for node in ray.nodes() if node["Alive"]] == [head], "the job starts from a head alone"
    out = tmp_path_factory.mktemp("autoscaled") / "job"
    # 1800 documents in shards of 200: the data stages go through Ray Data's actor pools on the tiers' nodes.
    # A 30 s capacity deadline: experts queued behind others and nodes being launched must not trip it.
    spec = build_spec(tiny_spec_dict(out, data={"max_documents": 1800, "rows_per_shard": 200},
                                     branch={"sync_rounds": 2}, resources={"capacity_timeout_s": 30}))
    events, views = [], [cluster_view()]  # what GET /v1/cluster says, before the job and as each task starts

    drivers = {}

    def record(event) -> None:
        events.append((time.time(), event))
        if event.event == "stage_started":
            views.append(cluster_view())
        if event.event == "progress" and event.stage == "submodel" and not drivers:
            drivers.update(actor_nodes("TrainerLauncher", "EventQueue", "TrainController"))

    summary = run_job_on_ray(spec, events=record)
    cost = json.loads(JobPaths(out).cost.read_text())
    # Each node's whole life from Ray's node table (the ledger's record of a node alive at the job's end is open),
    # with the request time the job's meter matched to it.
    requested = {node["node"]: node["requested_at"] for node in cost["usage"]["nodes"]}
    nodes = [{**asdict(life), "requested_at": requested.get(life.node)} for life in read_node_lives(spec.resources)]
    return {"spec": spec, "summary": summary, "events": events, "head": head, "address": cluster,
            "nodes": nodes, "uses": cost["usage"]["uses"], "views": views, "drivers": drivers,
            "metrics": read_metrics(JobPaths(out).metrics)}


def actor_nodes(*class_names: str) -> dict[str, str]:
    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")],
                         limit=1000, raise_on_missing_output=False)
    return {actor.class_name: actor.node_id for actor in actors if actor.class_name in class_names}


def uses_of(job: dict, stage: str, round_index: int | None = None) -> list[dict]:
    return [use for use in job["uses"] if use["stage"] == stage
            and (round_index is None or use.get("round") == round_index)]


def peak_alive(job: dict, groups: tuple[str, ...]) -> int:
    """The most nodes of `groups` alive at once during the job."""
    edges = sorted([(node["started_at"], 1) for node in job["nodes"] if node["group"] in groups]
                   + [(node["ended_at"], -1) for node in job["nodes"] if node["group"] in groups and node["ended_at"]])
    alive = [0]
    for _, step in edges:
        alive.append(alive[-1] + step)
    return max(alive)


def started_at(job: dict, stage: str) -> float:
    return min(t for t, event in job["events"] if event.event == "stage_started" and event.stage == stage)


def test_two_experts_train_at_once_on_nodes_the_autoscaler_added(job):
    cheap = {node["node"] for node in job["nodes"] if node["group"] in CHEAP_GROUPS}
    assert peak_alive(job, CHEAP_GROUPS) == MAX_NODES["cheap-4090"]
    trainers = [use for use in uses_of(job, "submodel") if use["resources"].get("GPU")]
    assert {use["node"] for use in trainers} <= cheap
    overlapping = [(a, b) for a in trainers for b in trainers
                   if a["node"] != b["node"] and a["start"] < b["end"] and b["start"] < a["end"]]
    assert overlapping, "no two experts trained at the same time"


def test_the_a100_node_comes_only_for_the_fine_tune(job):
    a100 = [node for node in job["nodes"] if node["group"] == "expensive-a100"]
    assert len(a100) == 1, a100
    asked = a100[0]["requested_at"] or a100[0]["started_at"]
    assert asked >= started_at(job, "finetune") - 1.0  # the autoscaler's clock has whole seconds
    assert {use["stage"] for use in job["uses"] if use["node"] == a100[0]["node"]} <= {"finetune", "evaluate"}


def test_data_stages_run_on_as_many_nodes_as_their_groups_allow(job):
    # prepare tokenizes on the CPU group (one node at most here), embed on the cheap groups (two).
    groups = {node["node"]: node["group"] for node in job["nodes"]}
    assert {groups[use["node"]] for use in uses_of(job, "prepare")} == {"cpu"}
    embed_nodes = {use["node"] for use in uses_of(job, "embed")}
    assert {groups[node] for node in embed_nodes} <= set(CHEAP_GROUPS)
    assert len(embed_nodes) == MAX_NODES["cheap-4090"], "the embedding pool did not grow to the group's maximum"


def test_no_node_is_launched_between_two_rounds(job):
    first_round_ends = max(use["end"] for use in uses_of(job, "submodel", 0))
    second_round = uses_of(job, "submodel", 1)
    second_round_starts = min(use["start"] for use in second_round)
    launched = [node for node in job["nodes"] if node["group"] in CHEAP_GROUPS
                and first_round_ends <= (node["requested_at"] or node["started_at"]) <= second_round_starts]
    assert not launched
    assert {use["node"] for use in second_round} <= {use["node"] for use in uses_of(job, "submodel", 0)}
    # The holds: the job's uses of the whole node (no resources) from a trainer's end, through the sync, given back
    # as soon as the next round's work started on the node.
    holds = [use for use in uses_of(job, "sync", 0) if not use["resources"]]
    assert holds and all(use["end"] is not None for use in holds)
    next_use = {node: min(use["start"] for use in second_round if use["node"] == node)
                for node in {use["node"] for use in second_round}}
    for hold in holds:
        assert hold["node"] in next_use and hold["end"] <= next_use[hold["node"]] + 2.0, hold


def test_each_trainer_held_one_gpu_of_its_tier(job):
    rows = [row for row in job["metrics"] if row.get("stage") in ("submodel", "finetune") and "gpu_ids" in row]
    tiers = {stage: {row["gpu_type"] for row in rows if row["stage"] == stage} for stage in ("submodel", "finetune")}
    assert tiers == {"submodel": {"4090"}, "finetune": {"A100"}}
    assert all(len(row["gpu_ids"]) == 1 and row["device"] == "cpu" for row in rows)  # a logical GPU, torch on CPU


def test_the_drivers_helpers_follow_it_the_job_actor_brings_up_a_cpu_node_and_a_simulated_gpu_is_hidden(job):
    """The job's launcher, event queue and trainers' controllers beside its driver (this test's process, on the
    head), none on a GPU pod. The service's job actor asks for a driver slot, which only the CPU group offers: the
    autoscaler brings up a CPU node for it (the job's one has gone idle by now). A worker on a simulated node sees no
    CUDA device."""
    head, spec = job["head"], job["spec"]
    assert set(job["drivers"].values()) == {head} and {"TrainerLauncher", "EventQueue"} <= set(job["drivers"])
    actor = ray.remote(JobActor).options(**job_actor_placement("ray")).remote("sqlite://")
    try:
        node = wait_until(lambda: actor_nodes("JobActor"), 180, what="the job actor")["JobActor"]
        group = next(n["Labels"].get("ray.io/node-group") for n in ray.nodes() if n["NodeID"] == node)
        assert node != head and group == "cpu", group
    finally:
        ray.kill(actor)
    probe = ray.remote(visible_devices_after_prepare).options(**task_options(spec, spec.resources.submodel_tier))
    assert ray.get(probe.remote(spec.resources.submodel_tier), timeout=180) == ("", [0])  # Ray gave GPU 0; torch none


def visible_devices_after_prepare(tier) -> tuple[str | None, list]:
    prepare_worker(tier)
    return os.environ.get("CUDA_VISIBLE_DEVICES"), ray.get_gpu_ids()


def test_the_head_runs_no_work_of_the_job(job):
    head, address = job["head"], job["address"]
    on_head = [task for task in list_tasks(address=address, filters=[("node_id", "=", head)], detail=True,
                                           limit=10000, raise_on_missing_output=False)]
    on_head += [actor for actor in list_actors(address=address, filters=[("node_id", "=", head)], detail=True,
                                               limit=10000, raise_on_missing_output=False)]
    asking = [(getattr(item, "name", "") or getattr(item, "class_name", ""), item.required_resources)
              for item in on_head if {"CPU", "GPU"} & {k for k, v in (item.required_resources or {}).items() if v}]
    assert not asking, f"work asked for the head's CPU or GPU: {asking}"
    assert not any(use["node"] == head for use in job["uses"])
    head_labels = next(node["Labels"] for node in ray.nodes() if node["NodeID"] == head)
    assert CONTROL_PLANE_LABEL.items() <= head_labels.items()


def test_the_api_shows_the_nodes_come_and_go(job):
    first, *during = job["views"]
    assert first.nodes == {} and first.autoscaling
    assert any(view.nodes.get("cheap-4090") == MAX_NODES["cheap-4090"] for view in during)
    assert any(view.nodes.get("cpu") for view in during)


def test_work_for_a_group_that_may_not_grow_fails_within_the_deadline(job, tmp_path):
    """A node group whose maximum is 0 (here the spot group, as a quota or a stock-out leaves it) never gets a node:
    the job fails once its work has waited `capacity_timeout_s`, naming what it waited for, and asks for nothing
    after. Its tiers are told apart by the node group label, so the full-parameter run can ask for that group only."""
    from ray.util.state import list_placement_groups

    from ray_cluster.capacity import CapacityTimeout

    key = "ray.io/node-group"
    spec = build_spec(tiny_spec_dict(tmp_path / "starved", method="full_parameter", resources={
        "label_key": key, "capacity_timeout_s": 8,
        "submodel_tier": {"label": "cheap-4090", "device_type": "rtx4090"},
        "cpu_tier": {"label": "cpu", "device_type": "cpu"},
        "finetune_tier": {"label": "cheap-4090-spot", "device_type": "rtx4090"}}))
    asked = time.monotonic()
    with pytest.raises(CapacityTimeout) as failed:
        run_job_on_ray(spec)
    waited = time.monotonic() - asked
    assert f"{key}=cheap-4090-spot" in str(failed.value) and "full_parameter" in str(failed.value)
    assert waited < 8 + 120  # the deadline, the data stages before it and the cluster's confirmation
    pending = [group for group in list_placement_groups(address=job["address"], limit=1000,
                                                        raise_on_missing_output=False) if group.state == "PENDING"]
    assert not pending, "the failed job left demand behind"


def test_every_worker_node_goes_once_the_jobs_are_done(job):
    """Last: the A100 node's idle timeout (60 s, its group's) runs while the tests above do."""
    def only_the_head():
        return [node["NodeID"] for node in ray.nodes() if node["Alive"]] == [job["head"]]

    wait_until(only_the_head, timeout_s=4 * IDLE_TIMEOUT_S + 90, interval_s=1, what="the worker nodes to go")
