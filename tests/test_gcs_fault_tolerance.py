"""A head restart mid-job on a local cluster with GCS fault tolerance: the job goes on, and no expert starts again.

A Redis from service/scripts/start_redis.sh (installed with apt-get when missing; the module skips, saying why, only
when it cannot be), and the static local cluster keeping its GCS tables in it (`LocalClusterSpec.redis_address`):
a head and one CPU node. A job is launched as the service's dispatcher launches it (`RayLauncher`: a detached job
actor named after the job), with the local runner, whose actor takes the CPU node's CPU and trains there; the Ray
runner's drivers on that node through a head restart are measured by benchmarks/head_restart.py (its job takes
longer than this suite may spend). Once an expert is past a checkpoint, every process of the head is killed
(SIGKILL of its GCS, raylet, dashboard and monitor, `kill_head`) and started again on the same ports and Redis.
What it must show: the actor is alive through it, and the restarted head knows it under the same Ray session (so
a dispatcher leaves the job to it); the job succeeds on its first attempt; each stage started once, so no expert
started again from step 0 or from a checkpoint.

    pytest tests/test_gcs_fault_tolerance.py -q
"""

from __future__ import annotations

import subprocess
from collections import Counter

import pytest
import ray
from ray.util.state import list_actors

from ray_cluster.local_cluster import (
    LocalClusterSpec,
    describe_nodes,
    free_port,
    kill_head,
    start_head,
    start_local_cluster,
    stop_local_cluster,
)
from service.core.config import Settings
from service.jobs.dispatcher import RayLauncher
from service.schemas import TERMINAL_STATES
from service.store.store import Store
from tests.conftest import CORPUS, tiny_spec_dict
from tests.helpers import REPO, wait_until

pytestmark = pytest.mark.slow

START_REDIS = REPO / "service" / "scripts" / "start_redis.sh"
NAMESPACE = "moedisco-gcs-ft"
# Two experts of 240 steps (about 15 s each here), a checkpoint every 20: the head is killed while one trains, past
# a checkpoint and with half its steps to go, so that it trains through the head's absence and restart.
STEPS = 240
SPEC = dict(method="moe_disco", model={"num_experts": 2, "num_experts_per_tok": 1},
            submodel={"steps": STEPS, "checkpoint_every": 20, "eval_every": 20}, branch={"sync_rounds": 1})


@pytest.fixture(scope="module")
def redis_address():
    started = subprocess.run(["bash", str(START_REDIS)], capture_output=True, text=True, timeout=600)
    if started.returncode != 0:
        pytest.skip(f"no Redis for GCS fault tolerance: {START_REDIS.name} failed:\n{started.stderr[-2000:]}")
    address = started.stdout.strip()
    yield address
    subprocess.run(["bash", str(START_REDIS), "--stop", address], check=False, timeout=60)


@pytest.fixture(scope="module")
def cluster(redis_address):
    assert not ray.is_initialized(), "this process must not be a driver on the head it kills"
    spec = LocalClusterSpec(num_cheap=0, num_expensive=0, num_cpu=1, redis_address=redis_address,
                            dashboard_port=free_port())
    address = start_local_cluster(spec=spec)
    try:
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        stop_local_cluster()


def alive_actor(address: str, job_id: str) -> tuple[str, dict] | None:
    """This cluster's Ray session and the labels of the node the job's actor is alive on; None while it is not (or
    the state API is not up yet). Asked as a driver that leaves at once: a driver on the head dies with it."""
    from ray.util.state.exception import RayStateApiException

    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    try:
        alive = list_actors(address=address, filters=[("name", "=", f"job-{job_id}"), ("state", "=", "ALIVE")],
                            raise_on_missing_output=False)
        labels = {node["node_id"]: node["labels"] for node in describe_nodes()}
        session = ray.get_runtime_context().get_session_name()
    except RayStateApiException:
        return None
    finally:
        ray.shutdown()
    return (session, labels[alive[0].node_id]) if alive else None


def expert_past_checkpoint(store: Store, job_id: str):
    job = store.get_job(job_id)
    assert job.state == "running", f"the job ended before an expert was interrupted: {job.state} ({job.reason})"
    return next((stage for stage in store.stages(job_id) if stage.stage == "submodel" and stage.state == "running"
                 and 20 <= (stage.step or 0) <= stage.total_steps // 2), None)


def test_a_job_goes_on_through_a_head_restart(cluster, tmp_path):
    url = f"sqlite:///{tmp_path / 'moedisco.db'}"
    settings = Settings(data_dir=tmp_path, database_url=url, runner="local", input_roots=[CORPUS.parent],
                        ray_namespace=NAMESPACE)
    store = Store(url)
    job = store.create_job("f" * 12, tiny_spec_dict(tmp_path / "job", name="headless", **SPEC), runner="local")
    assert store.claim_next_queued().id == job.id and store.begin_attempt(job.id)
    ray.init(address=cluster, namespace=NAMESPACE, log_to_driver=False)
    try:
        RayLauncher(settings).launch(job.id, "local")
        # The launch's `run` call is sent once the actor is up: this driver stays until the runner holds the job.
        wait_until(lambda: store.get_job(job.id).runner_id, 180, 0.5, "the runner's lease")
    finally:
        ray.shutdown()
    session, where = wait_until(lambda: alive_actor(cluster, job.id), 60, 0.5, "the job actor alive")
    assert where.get("gpu_type") == "cpu", where

    interrupted = wait_until(lambda: expert_past_checkpoint(store, job.id), 300, 0.1, "an expert under way")
    events_at_kill = len(store.events(job.id))
    kill_head()
    # The head is gone: the job actor on the CPU node is not, and it keeps recording into the store.
    wait_until(lambda: len(store.events(job.id)) > events_at_kill, 60, what="progress while the head is down")
    start_head()
    # The job's actor in the restarted head's tables, in the same Ray session (the dispatcher's test of a runner
    # still alive in its own cluster).
    assert wait_until(lambda: alive_actor(cluster, job.id), 60, 0.5, "the job actor known") == (session, where)

    done = wait_until(lambda: (row := store.get_job(job.id)).state in TERMINAL_STATES and row, 600,
                      what="the job's end")
    assert (done.state, done.attempts) == ("succeeded", 1), done.reason
    starts = Counter(event.stage if event.expert is None else f"{event.stage}/{event.expert}"
                     for event in store.events(job.id, "stage_started"))
    assert starts[interrupted.key] == 1 and set(starts.values()) == {1}, starts
    assert {"submodel/0", "submodel/1", "finetune"} <= starts.keys()
    finished = next(stage for stage in store.stages(job.id) if stage.key == interrupted.key)
    assert finished.step == finished.total_steps == STEPS and not finished.summary.get("resumed_from")
    store.close()
