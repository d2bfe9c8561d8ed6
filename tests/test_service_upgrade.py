"""A control-plane upgrade, three times in one job's life: two control planes (each a Ray cluster and a service on
it) on one store, the older one killed each time, as KubeRay's NewCluster upgrade deletes the old cluster.

Each round a new plane starts while the job trains on the old one. Its dispatcher takes the store's dispatch lease at
its first pass, so the old one launches nothing more, and the old plane's runner hands the job over at its next
checkpoint. The old plane is then killed (`SIGKILL` to its service and to every process of its cluster):
  - rounds 1 and 3 as soon as the new plane dispatches, its runner still training or handing over: the new plane
    relaunches the job once the runner's lease is stale (or free);
  - round 2 after its runner handed the job over: the new plane relaunches it at its next pass.
The job succeeds, `attempts` counts none of the three (`cluster_restarts` does), every runner started only after
the previous one had handed over or died with its cluster (no two wrote the job folder at once), and every
training stage that started again went on from a checkpoint.

    pytest tests/test_service_upgrade.py -q
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import ray.util
from typer.testing import CliRunner

from moedisco_cli.api_client import ApiClient
from moedisco_cli.main import app
from service.schemas import TERMINAL_STATES
from service.store.models import utcnow
from service.store.store import Store
from tests.conftest import CORPUS, tiny_spec_dict
from tests.helpers import (
    REPO,
    ServiceProcess,
    free_port,
    service_process_env,
    training_stage,
    wait_for_state,
    wait_until,
)

pytestmark = pytest.mark.slow

TOKEN = "upgrade-token"
NAMESPACE = "moedisco-upgrade"
TRAINING = ("submodel", "finetune")
# The tiny model trains at tens of steps a second: stages long enough that each of the three upgrades (a service
# starting, a runner handing over or going stale, a new one importing torch) finds one training.
SPEC = tiny_spec_dict("x", name="upgraded", model={"num_experts": 2, "num_experts_per_tok": 1},
                      submodel={"steps": 700, "checkpoint_every": 20, "eval_every": 200}, branch={"sync_rounds": 1},
                      finetune={"steps": 100, "checkpoint_every": 20, "eval_every": 100})
# One Ray cluster, a head with 2 CPUs, held by this process until it is killed with its whole session.
KEEPER = """
import sys, time
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 2, "object_store_memory": 150 * 2**20, "include_dashboard": False, "gcs_server_port": int(sys.argv[1])})
open(sys.argv[2], "w").write(cluster.address)
while True:
    time.sleep(1)
"""


class Plane:
    """A control plane: a Ray cluster of its own (a keeper process and its session), started ahead, and a service on
    it (`serve`), started at the upgrade."""

    def __init__(self, tmp_path: Path, name: str):
        self.tmp_path, self.name, self.service = tmp_path, name, None
        port, address_file = free_port(), tmp_path / f"{name}.address"
        # Ray's internals find "their" cluster by RAY_ADDRESS first: with two on one machine, each is told its own.
        own = {**os.environ, "RAY_ADDRESS": f"{ray.util.get_node_ip_address()}:{port}"}
        with (tmp_path / f"{name}.cluster.log").open("w") as log:
            self.keeper = subprocess.Popen([sys.executable, "-c", KEEPER, str(port), str(address_file)], cwd=REPO,
                                           env=own, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.address = wait_until(lambda: address_file.exists() and address_file.read_text(), 120,
                                      what=f"cluster {name}")
        except BaseException:  # its processes must not outlive the test
            self.kill()
            raise

    def serve(self, env: dict[str, str]) -> Plane:
        self.service = ServiceProcess(["--address", self.address], env, self.tmp_path / f"{self.name}.service.log")
        self.client = ApiClient(self.service.start().url, TOKEN)
        return self

    def kill(self) -> None:
        """As a deleted cluster goes: no drain, no shutdown hook."""
        if self.service is not None:
            self.service.kill()
        if self.keeper.poll() is None:
            os.killpg(self.keeper.pid, signal.SIGKILL)
            self.keeper.wait(timeout=30)


def training(store: Store, job_id: str):
    """A training stage running past its first checkpoint, with steps left to go."""
    return training_stage(store, job_id, past=4, left=8)


def runner_events(store: Store, job_id: str, state: str) -> list:
    return [event for event in store.events(job_id, "runner") if event.data["state"] == state]


def test_a_job_outlives_three_upgrades_of_its_control_plane(tmp_path):
    env = service_process_env(tmp_path, TOKEN, NAMESPACE, CORPUS.parent, max_attempts="1")
    store = Store(env["MOEDISCO_DATABASE_URL"])
    planes, killed_at = [Plane(tmp_path, "plane0").serve(env)], {}
    try:
        job_id = planes[0].client.submit(SPEC)["id"]
        for upgrade in (1, 2, 3):
            old, new = planes[-1], Plane(tmp_path, f"plane{upgrade}")
            planes.append(new)
            wait_until(lambda: training(store, job_id), 300, what=f"training before upgrade {upgrade}")
            holder = store.dispatch_holder().holder
            new.serve(env)
            wait_until(lambda: store.dispatch_holder().holder != holder, 60, what="the new plane dispatching")
            if upgrade == 2:
                wait_until(lambda: runner_events(store, job_id, "handed_over"), 120, what="the runner handing over")
            old_cluster = runner_events(store, job_id, "started")[-1].data["ray_session"]
            old.kill()
            killed_at[old_cluster] = utcnow()
        job = wait_for_state(planes[-1].client, job_id, TERMINAL_STATES, 600)
        shown = CliRunner().invoke(app, ["status", job_id], env={"MOEDISCO_API_URL": planes[-1].service.url,
                                                                  "MOEDISCO_API_TOKEN": TOKEN, "COLUMNS": "200"})
    finally:
        for plane in planes:
            plane.kill()
    logs = "\n".join(path.read_text()[-2000:] for path in sorted(tmp_path.glob("*.service.log")))
    assert job["state"] == "succeeded", (job["reason"], logs)
    assert (job["attempts"], job["cluster_restarts"]) == (1, 3), logs
    assert "runner starts: 1 charged to the job, 3 after cluster events" in " ".join(shown.output.split())

    # One runner per plane, in order; each started only once the one before had handed over or died with its plane.
    started = runner_events(store, job_id, "started")
    assert len(started) == 4 and len({event.data["ray_session"] for event in started}) == 4
    handed_over = {event.data["runner"]: event.time for event in runner_events(store, job_id, "handed_over")}
    assert handed_over, "no runner handed the job over"
    for before, after in zip(started, started[1:]):
        gone = handed_over.get(before.data["runner"], killed_at.get(before.data["ray_session"]))
        assert gone is not None and after.time > gone, (before.data, after.data)

    # Every training stage that started again went on from a checkpoint, not from step 0.
    starts = Counter(event.stage if event.expert is None else f"{event.stage}/{event.expert}"
                     for event in store.events(job_id, "stage_started"))
    again = [stage for stage in store.stages(job_id) if starts[stage.key] > 1 and stage.stage in TRAINING]
    assert again and all(stage.summary["resumed_from"] >= 4 for stage in again), starts
    store.close()
