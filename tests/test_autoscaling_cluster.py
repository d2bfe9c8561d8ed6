"""The autoscaling local cluster: a head alone, and Ray's autoscaler v2 adding a node of the group that a pending
task's label selector asks for, and removing it when idle (`ray_cluster.autoscaling`).

One cluster in this process, at most one node per group (none of the spot group, so that the 4090 selector has one
group to scale), an idle timeout of a few seconds. Every process the cluster started, the autoscaler's nodes among
them, is gone after `stop_local_cluster()`: each started with the cluster's RAY_ADDRESS.

    pytest tests/test_autoscaling_cluster.py -q
"""

from __future__ import annotations

import os
import time

import psutil
import pytest
import ray
from ray.util.state import list_nodes

from ray_cluster import local_cluster
from ray_cluster.autoscaling import launch_requests
from ray_cluster.local_cluster import (
    CONTROL_PLANE_LABEL,
    SIMULATED_LABEL,
    LocalClusterSpec,
    free_port,
    start_local_cluster,
    stop_local_cluster,
)
from tests.helpers import wait_until

pytestmark = pytest.mark.slow

IDLE_TIMEOUT_S = 8
MAX_NODES = {"cheap-4090": 1, "cheap-4090-spot": 0, "expensive-a100": 1}
SCALE_UP_TIMEOUT_S = 120  # a node starts in seconds; two loaded cores, other Ray clusters beside this one


@ray.remote(num_cpus=1, num_gpus=1)
def node_of_this_task() -> str:
    return ray.get_runtime_context().get_node_id()


def requests_while_pending(task, gcs_address: str) -> list[dict]:
    """The autoscaler's launch requests seen while `task` waits for its node."""
    requests, deadline = [], time.monotonic() + SCALE_UP_TIMEOUT_S
    while not ray.wait([task], timeout=0.25)[0] and time.monotonic() < deadline:
        requests += launch_requests(gcs_address)
    return requests


def running(processes: list[psutil.Process]) -> list[psutil.Process]:
    def runs(process: psutil.Process) -> bool:
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return [process for process in processes if runs(process)]


def processes_of(gcs_address: str) -> list[psutil.Process]:
    """Processes of this machine started with the cluster's address: every process of its nodes inherits it."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get("RAY_ADDRESS") == gcs_address:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # gone, or another user's
            continue
    return found


def node_state(gcs_address: str, node_id: str):
    return next(node for node in list_nodes(address=gcs_address, detail=True, limit=100) if node.node_id == node_id)


def test_a_labelled_task_brings_a_node_of_its_group_which_goes_when_idle():
    address = start_local_cluster(spec=LocalClusterSpec(autoscale=True, max_nodes=MAX_NODES,
                                                        idle_timeout_s=IDLE_TIMEOUT_S, dashboard_port=free_port()))
    cluster, started = local_cluster._in_process, []
    try:
        ray.init(address=address, log_to_driver=False)
        head = ray.get_runtime_context().get_node_id()
        assert [node["NodeID"] for node in ray.nodes()] == [head]  # no worker node before work asks for one

        task = node_of_this_task.options(label_selector={"gpu_type": "4090"}).remote()
        requests = requests_while_pending(task, address)
        node_id = ray.get(task, timeout=SCALE_UP_TIMEOUT_S)
        started = cluster.processes() + processes_of(address)  # now with the node's, to check after the stop

        assert node_id != head
        assert {request["node_type"] for request in requests} == {"cheap-4090"}
        nodes = {node["NodeID"]: node for node in ray.nodes()}
        assert set(nodes) == {head, node_id}
        labels = nodes[node_id]["Labels"]
        assert {"gpu_type": "4090", SIMULATED_LABEL[0]: SIMULATED_LABEL[1], "ray.io/node-group": "cheap-4090",
                "ray.io/market-type": "on-demand"}.items() <= labels.items()
        assert nodes[node_id]["Resources"]["GPU"] == 1 and nodes[node_id]["Resources"]["CPU"] == 1
        assert {"gpu_type": "head", **CONTROL_PLANE_LABEL}.items() <= nodes[head]["Labels"].items()
        assert "GPU" not in nodes[head]["Resources"]
        assert node_state(address, node_id).labels["ray.io/node-group"] == "cheap-4090"  # the state API's view

        wait_until(lambda: node_state(address, node_id).state == "DEAD", 4 * IDLE_TIMEOUT_S + 30, 0.5,
                   "the idle node to be removed")
    finally:
        ray.shutdown()
        stop_local_cluster()
    assert started and not running(started) and not running(processes_of(address))
