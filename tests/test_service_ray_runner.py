"""End to end with the Ray runner: the service's job actor hands the job to `ray_cluster.orchestrate`, which
places its stages on the simulated cluster's labelled tiers (gpu_type=4090 / A100).

The job is the tiny full-parameter baseline: it crosses the same service-to-runner seam (events, expert states,
cost rows, outcome) as a MoE-DisCo job, in a third of the time (Ray Data and one trainer per submodel would add
about two minutes on two cores). Skips, saying why, while `ray_cluster.orchestrate` cannot be imported.

    pytest tests/test_service_ray_runner.py -q
"""

from __future__ import annotations

import pytest
import ray

from moedisco_cli.api_client import ApiClient
from service.core.config import Settings
from service.main import create_app
from service.schemas import TERMINAL_STATES
from tests.conftest import CORPUS, tiny_spec_dict
from tests.helpers import LiveServer, free_port, wait_for_state, wait_until

try:
    from ray_cluster.local_cluster import LocalClusterSpec, start_local_cluster, stop_local_cluster
    from ray_cluster.orchestrate import run_job_on_ray  # noqa: F401  (the runner the job actor will import)
except ImportError as error:
    pytest.skip(f"ray_cluster.orchestrate is not importable yet ({error}); the Ray runner is tested once it is",
                allow_module_level=True)

pytestmark = pytest.mark.slow

TOKEN = "ray-runner-token"
NAMESPACE = "moedisco-ray-runner"


@pytest.fixture(scope="module")
def service_url(tmp_path_factory):
    # Ray's default dashboard port may belong to another cluster on this machine.
    address = start_local_cluster(spec=LocalClusterSpec(num_cheap=2, num_expensive=1, dashboard_port=free_port()))
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        data_dir = tmp_path_factory.mktemp("service")
        settings = Settings(data_dir=data_dir, database_url=f"sqlite:///{data_dir / 'moedisco.db'}", api_token=TOKEN,
                            runner="ray", input_roots=[CORPUS.parent], ray_namespace=NAMESPACE,
                            dispatch_interval_s=0.5)
        with LiveServer(create_app(settings)) as url:
            yield url
    finally:
        ray.shutdown()
        stop_local_cluster()


def test_tiny_job_on_the_labelled_tiers(service_url):
    client = ApiClient(service_url, TOKEN, timeout=60)
    spec = tiny_spec_dict("x", method="full_parameter", model={"num_experts": 2, "num_experts_per_tok": 1})
    job_id = client.submit(spec)["id"]
    job = wait_for_state(client, job_id, TERMINAL_STATES, 600)
    assert job["state"] == "succeeded", job["reason"]
    assert job["runner"] == "ray" and job["result"]["final"].endswith("final")
    trained = next(s for s in job["stages"] if s["stage"] == "full_parameter")
    assert trained["state"] == "finished" and trained["runner_state"] == "done"  # the Ray runner's own word
    assert trained["step"] == trained["total_steps"] == 12
    cost = client.cost(job_id)
    # The CPU tier's set-up work (prepare and the source model, each on the CPU node), then the training.
    assert [(row["stage"], row["tier"]) for row in cost["stages"]] == [("prepare", "cpu"), ("source", "cpu"),
                                                                        ("full_parameter", "A100")]
    assert cost["total_usd"] > 0 and cost["note"] == "this job is a full-parameter baseline"
    # The job's driver held a slot of the CPU node for the whole job: billed to it, as the node's time it kept busy.
    driver = [row for row in cost["billed"]["rows"] if row["stage"] == "driver"]
    assert len(driver) == 1 and driver[0]["busy_seconds"] > 0 and "cpu" in driver[0]["group"], cost["billed"]["rows"]


def test_two_dispatchers_on_one_store_launch_one_runner(service_url, tmp_path):
    """A RayService upgrade: the new cluster's dispatcher finds no job actor of its own (another namespace here,
    as another cluster there) while the old cluster's runner holds the lease; it leaves the job to that runner."""
    from ray.util.state import list_actors

    from service.jobs.dispatcher import Dispatcher, RayLauncher
    from service.store.store import Store

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    store = Store(url)
    settings = [Settings(data_dir=tmp_path, database_url=url, runner="local", ray_namespace=f"moedisco-{name}",
                         input_roots=[CORPUS.parent],
                         lease_ttl_s=30) for name in ("old", "new")]
    old, new = (Dispatcher(store, RayLauncher(each), each) for each in settings)
    job = store.create_job("d" * 12, tiny_spec_dict(tmp_path / "job", method="moe_disco"), runner="local")
    old.tick()  # starts the queued job: its runner in the old cluster's namespace
    new.tick()
    assert wait_until(lambda: store.get_job(job.id).runner_id is not None, 120, what="the runner's lease")
    new.tick()
    store.request_cancel(job.id)
    assert wait_until(lambda: store.get_job(job.id).state in TERMINAL_STATES, 120, what="the job cancelled")
    new.tick()
    done = store.get_job(job.id)
    assert (done.state, done.attempts) == ("cancelled", 1)
    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("name", "=", f"job-{job.id}")],
                         detail=True, raise_on_missing_output=False)
    assert [actor.ray_namespace for actor in actors] == ["moedisco-old"]
    store.close()
