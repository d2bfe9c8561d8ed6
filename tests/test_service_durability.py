"""Durability: `kill -9` the service mid-job, then its runner too; restarted, the service finishes the job.

A Ray cluster (ray.cluster_utils.Cluster) outlives everything else here. The service runs as a subprocess
(`moedisco serve --no-ray-serve --address ...`), so SIGKILL takes it down with no shutdown hook:
  1. the service is killed mid-training: the job's detached runner keeps training and recording into the store;
  2. the runner is killed too, after a checkpoint of the stage it trains;
  3. a new service reconciles: the job marked running has no runner, so it is relaunched on its output_dir.
The job then succeeds with every finished stage skipped and the interrupted one resumed from its checkpoint, its
runner's loss (`ray.kill` on a live node) counted as one of its attempts; a runner lost with its node is not.

    pytest tests/test_service_durability.py -q
"""

from __future__ import annotations

from collections import Counter

import pytest
import ray
from ray.cluster_utils import Cluster

from moedisco_cli.api_client import ApiClient
from service.schemas import TERMINAL_STATES
from service.store.store import Store
from tests.conftest import CORPUS, tiny_spec_dict
from tests.helpers import (
    ServiceProcess,
    free_port,
    service_process_env,
    training_stage,
    wait_for_state,
    wait_until,
)

pytestmark = pytest.mark.slow

TOKEN = "durable-token"
NAMESPACE = "moedisco-durability"
# 40 steps, a checkpoint every 4: a wide window in which a stage is past a checkpoint and not yet finished. One
# synchronisation round, so that the window is not cut by round ends (tests/test_pipeline.py resumes across rounds).
SPEC = tiny_spec_dict("x", name="durable", model={"num_experts": 2, "num_experts_per_tok": 1},
                      submodel={"steps": 40, "checkpoint_every": 4, "eval_every": 4}, branch={"sync_rounds": 1})


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "object_store_memory": 150 * 2**20, "include_dashboard": False,
        "dashboard_port": free_port()})  # Ray's default 8265 may belong to another cluster on this machine
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def training_stage_past_checkpoint(store: Store, job_id: str):
    """The running training stage once it logged a step past a checkpoint and still has 12 steps to go."""
    return training_stage(store, job_id, past=8, left=12)


def runner_alive(job_id: str) -> bool:
    try:
        ray.get_actor(f"job-{job_id}", namespace=NAMESPACE)
        return True
    except ValueError:
        return False


def test_job_survives_the_service_and_resumes_after_its_runner_dies(cluster, tmp_path):
    env, log = service_process_env(tmp_path, TOKEN, NAMESPACE, CORPUS.parent), tmp_path / "service.log"
    store = Store(f"sqlite:///{tmp_path / 'data' / 'moedisco.db'}")
    with ServiceProcess(["--address", cluster.address], env, log) as first:
        job_id = ApiClient(first.url, TOKEN).submit(SPEC)["id"]
        wait_until(lambda: training_stage_past_checkpoint(store, job_id), 300, what="training under way")
        first.kill()
    events_at_kill = len(store.events(job_id))

    # 1. The API is gone; the detached runner is not, and it keeps recording.
    assert runner_alive(job_id)
    wait_until(lambda: len(store.events(job_id)) > events_at_kill, 120, what="progress while the API is down")

    # 2. The runner dies too, mid-stage, past a checkpoint.
    killed = wait_until(lambda: training_stage_past_checkpoint(store, job_id), 120, what="a stage to interrupt")
    ray.kill(ray.get_actor(f"job-{job_id}", namespace=NAMESPACE))
    wait_until(lambda: not runner_alive(job_id), 30, what="runner gone")

    # 3. A new service resumes it.
    with ServiceProcess(["--address", cluster.address], env, log) as second:
        client = ApiClient(second.url, TOKEN)
        assert job_id in [job["id"] for job in client.jobs()["data"]]
        job = wait_for_state(client, job_id, TERMINAL_STATES, 300)
    assert job["state"] == "succeeded", (job["reason"], log.read_text()[-3000:])
    assert job["attempts"] == 2

    starts = Counter(e.stage if e.expert is None else f"{e.stage}/{e.expert}"
                     for e in store.events(job_id, "stage_started"))
    assert starts[killed.key] == 2 and all(n == 1 for key, n in starts.items() if key != killed.key), starts
    resumed = next(s for s in store.stages(job_id) if s.key == killed.key)
    assert resumed.summary["resumed_from"] >= 4  # continued from a checkpoint, not from step 0
    skipped = {e.stage for e in store.events(job_id, "stage_skipped")}
    assert {"prepare", "embed", "cluster"} <= skipped  # done before the runner died: not run again
    store.close()


def test_the_dispatcher_tells_a_runner_lost_with_its_node_from_one_lost_to_the_job(cluster, tmp_path):
    """What decides whether a relaunch uses up one of the job's attempts (`RayLauncher.node_loss`), read from the
    GCS: a runner actor that died with its node (here: the node removed) is a cluster event; one killed on a live
    node (a crash, `ray.kill`) is the job's own loss."""
    from service.core.config import Settings
    from service.jobs.dispatcher import RayLauncher

    launcher = RayLauncher(Settings(data_dir=tmp_path, ray_namespace=NAMESPACE))
    node = cluster.add_node(num_cpus=1, resources={"doomed": 2})
    runner = ray.remote(num_cpus=0, resources={"doomed": 1})(Sleeper)
    on_node = runner.options(name="job-node0000lost", namespace=NAMESPACE, lifetime="detached").remote()
    killed = runner.options(name="job-killed000000", namespace=NAMESPACE, lifetime="detached").remote()
    ray.get([on_node.ready.remote(), killed.ready.remote()], timeout=60)
    ray.kill(killed)
    cluster.remove_node(node)
    wait_until(lambda: not runner_alive("node0000lost"), 60, what="the runner gone with its node")
    assert launcher.node_loss("node0000lost").startswith("its node died")
    assert launcher.node_loss("killed000000") is None
    assert launcher.node_loss("never0started") is None


class Sleeper:
    def ready(self) -> bool:
        return True
