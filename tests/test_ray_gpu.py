"""GPU tiers with no node: a job on a cluster without an autoscaler fails at once, naming the label; and which
nodes of the local cluster get this machine's real GPU. (A job on GPU tiers that start at zero nodes, with Ray's
own autoscaler adding them, is tests/test_autoscaling_job.py.)
"""

from __future__ import annotations

import time

import pytest
import ray

from moedisco.config.loading import build_spec
from ray_cluster.local_cluster import (
    SIMULATED_LABEL,
    LocalClusterSpec,
    free_port,
    start_local_cluster,
    stop_local_cluster,
)
from ray_cluster.orchestrate import run_job_on_ray
from ray_cluster.placement import TierUnreachable
from tests.conftest import tiny_spec_dict

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


def test_the_local_cluster_gives_a_real_gpu_to_the_expensive_nodes_alone(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    nodes = LocalClusterSpec(num_cheap=2, num_expensive=1).nodes()
    assert nodes[2] == ({"gpu_type": "A100"}, 1)  # the real card: billed as real, used by the fine-tune alone
    assert all(labels[SIMULATED_LABEL[0]] == "true" and gpus == 1 for labels, gpus in nodes[:2])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert all(labels.get(SIMULATED_LABEL[0]) == "true" for labels, gpus in LocalClusterSpec().nodes() if gpus)
