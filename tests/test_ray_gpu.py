"""A job on a cluster whose GPU tiers start at zero nodes, as KubeRay's 4090 and A100 groups do (k8s/).

One local cluster: a head (`moedisco.io/role=control-plane`) and, added while the job runs as an autoscaler adds
pods, 4090 nodes and an A100 node with one logical GPU each (the A100 one marked simulated). The job is the tiny
one with 2 experts and one round. This machine has no CUDA: a worker holding a logical GPU still trains on the CPU
(`device: auto` finds no CUDA), and on the simulated node it also hides CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import ray
from ray.util.state import list_actors

from moedisco.config.loading import build_spec
from moedisco.job.events import ExpertState
from moedisco.job.layout import JobPaths
from moedisco.job.metrics import read_metrics
from ray_cluster.local_cluster import (
    CONTROL_PLANE_LABEL,
    SIMULATED_LABEL,
    LocalClusterSpec,
    free_port,
    start_local_cluster,
    stop_local_cluster,
)
from ray_cluster.orchestrate import run_job_on_ray
from ray_cluster.placement import TierUnreachable, prepare_worker, task_options
from service.jobs.dispatcher import job_actor_placement
from service.jobs.executor import JobActor
from tests.conftest import tiny_spec_dict
from tests.helpers import add_local_node, wait_until

pytestmark = pytest.mark.slow

TRAIN = {"steps": 300, "eval_every": 100, "checkpoint_every": 100, "eval_batches": 1}  # expert 0 must outlast a node start


@pytest.fixture(scope="module")
def cluster():
    address = start_local_cluster(spec=LocalClusterSpec(num_cheap=0, num_expensive=0, dashboard_port=free_port()))
    ray.init(address=address, log_to_driver=False)
    try:
        yield {"head": ray.get_runtime_context().get_node_id()}
    finally:
        ray.shutdown()
        stop_local_cluster()


def gpu_spec(output_dir, **resources):
    return build_spec(tiny_spec_dict(
        output_dir, model={"num_experts": 2}, branch={"sync_rounds": 1}, data={"max_documents": 160},
        submodel=TRAIN, finetune={"steps": 4, "eval_every": 4, "checkpoint_every": 4, "eval_batches": 1},
        resources=resources))


def test_a_label_no_node_carries_fails_fast_without_an_autoscaler(cluster, tmp_path):
    started = time.monotonic()
    with pytest.raises(TierUnreachable, match="gpu_type=4090"):
        run_job_on_ray(gpu_spec(tmp_path / "job"))  # no 4090 node yet, and this cluster has no autoscaler
    assert time.monotonic() - started < 30


def pending_gpu_placement_groups() -> int:
    return sum(1 for group in ray.util.placement_group_table().values()
               if group["state"] == "PENDING" and any(b.get("GPU") for b in group["bundles"].values()))


def actor_nodes(*class_names: str) -> dict[str, str]:
    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")],
                         limit=1000, raise_on_missing_output=False)
    return {a.class_name: a.node_id for a in actors if a.class_name in class_names}


def experts_in(events: list, stage: str, state: str) -> list[int]:
    return [e.expert for e in events if isinstance(e, ExpertState) and e.stage == stage and e.state == state]


@pytest.fixture(scope="module")
def job(cluster, tmp_path_factory):
    """The job submitted before any GPU node exists; nodes join as the job asks for them."""
    spec = gpu_spec(tmp_path_factory.mktemp("gpu") / "job", autoscaling=True)
    events, outcome = [], {}

    def run():
        try:
            outcome["summary"] = run_job_on_ray(spec, events=events.append)
        except BaseException as error:  # re-raised in the test's thread below
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(3)  # the job waits for its cheap tier: nothing can place the data worker yet
    seen = {"submodel_before_nodes": bool(experts_in(events, "submodel", "waiting"))}
    add_local_node({"gpu_type": "4090"})
    # Both experts are submitted with one cheap node: the second one's pending placement group is the demand
    # an autoscaler reads to add a pod.
    seen["pending_with_one_node"] = wait_until(
        lambda: experts_in(events, "submodel", "running") and pending_gpu_placement_groups(), 240, what="demand")
    seen["drivers"] = actor_nodes("TrainerLauncher", "EventQueue")
    add_local_node({"gpu_type": "4090"})
    add_local_node({"gpu_type": "A100", SIMULATED_LABEL[0]: SIMULATED_LABEL[1]})
    thread.join(timeout=300)
    assert not thread.is_alive(), "the job did not finish"
    if "error" in outcome:
        raise outcome["error"]
    return {"spec": spec, "events": events, "seen": seen, "metrics": read_metrics(JobPaths(spec.output_dir).metrics)}


def test_trainers_wait_for_nodes_then_every_expert_is_submitted(job):
    assert not job["seen"]["submodel_before_nodes"]
    assert job["seen"]["pending_with_one_node"] >= 1  # expert 1 asked for a node while expert 0 trained


def test_each_expert_held_one_gpu_of_its_own_node(job):
    rows = [r for r in job["metrics"] if r.get("stage") == "submodel" and "gpu_ids" in r]
    nodes = {r["expert"]: r["node"] for r in rows}
    assert sorted(nodes) == [0, 1] and len(set(nodes.values())) == 2  # no two experts on one one-GPU node
    assert all(len(r["gpu_ids"]) == 1 and r["gpu_type"] == "4090" and r["device"] == "cpu" for r in rows)


def test_the_finetune_holds_the_a100_gpu(job):
    rows = [r for r in job["metrics"] if r.get("stage") == "finetune" and "gpu_ids" in r]
    assert rows and all(r["gpu_type"] == "A100" and len(r["gpu_ids"]) == 1 for r in rows)


def test_the_driver_actors_sit_on_the_head(cluster, job):
    assert job["seen"]["drivers"] == {"TrainerLauncher": cluster["head"], "EventQueue": cluster["head"]}
    actor = ray.remote(JobActor).options(**job_actor_placement("ray")).remote("sqlite://")
    try:
        wait_until(lambda: actor_nodes("JobActor"), 60, what="the job actor")
        assert actor_nodes("JobActor") == {"JobActor": cluster["head"]}
        assert ray.get(ray.remote(lambda: ray.get_runtime_context().get_node_labels()).options(
            **job_actor_placement("ray")).remote()).items() >= CONTROL_PLANE_LABEL.items()
    finally:
        ray.kill(actor)


def visible_devices_after_prepare(tier) -> tuple[str | None, list]:
    prepare_worker(tier)
    return os.environ.get("CUDA_VISIBLE_DEVICES"), ray.get_gpu_ids()


def test_a_simulated_node_hides_its_logical_gpu_from_torch(job):
    spec, probe = job["spec"], ray.remote(visible_devices_after_prepare)
    simulated = probe.options(**task_options(spec, spec.resources.finetune_tier)).remote(spec.resources.finetune_tier)
    logical = probe.options(**task_options(spec, spec.resources.submodel_tier)).remote(spec.resources.submodel_tier)
    assert ray.get(simulated) == ("", [0])  # Ray assigned GPU 0; torch sees none
    assert ray.get(logical) == ("0", [0])


def test_the_local_cluster_gives_a_real_gpu_to_the_expensive_nodes_alone(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    nodes = LocalClusterSpec(num_cheap=2, num_expensive=1).nodes()
    assert nodes[2] == ({"gpu_type": "A100"}, 1)  # the real card: billed as real, used by the fine-tune alone
    assert all(labels[SIMULATED_LABEL[0]] == "true" and gpus == 1 for labels, gpus in nodes[:2])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert all(labels.get(SIMULATED_LABEL[0]) == "true" for labels, gpus in LocalClusterSpec().nodes() if gpus)
