"""GCS fault tolerance in k8s/: both clusters keep the GCS's tables in a Redis the operator provides, as KubeRay
v1.7.0's `gcsFaultToleranceOptions` take it, and the jobs' drivers sit on the cpu group, not on the head whose
restart the GCS survives. The manifests, their CRD schema check and the helpers are those of
tests/test_k8s_manifests.py; the local cluster's head restart is tests/test_gcs_fault_tolerance.py.

    pytest tests/test_k8s_gcs_ft.py -q
"""

from __future__ import annotations

import copy
import json

import pytest

from moedisco.config.resources import DRIVER_SLOTS_PER_NODE
from ray_cluster.local_cluster import DRIVER_RESOURCE
from tests.test_k8s_manifests import CLUSTER_PARAMS, named, ray_container, schema_errors, the

# KubeRay's validation.go (ValidateRayClusterSpec) refuses these beside gcsFaultToleranceOptions: the options are
# the one place the Redis is configured.
HEAD_ENV_REFUSED = {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD", "REDIS_USERNAME"}
START_PARAMS_REFUSED = {"redis-password", "redis-username"}
ANNOTATIONS_REFUSED = {"ray.io/ft-enabled", "ray.io/external-storage-namespace"}


@pytest.mark.parametrize("cluster", CLUSTER_PARAMS)
def test_the_gcs_keeps_its_tables_in_the_operators_redis(cluster: dict) -> None:
    options = cluster["gcsFaultToleranceOptions"]
    host, _, port = options["redisAddress"].removeprefix("redis://").removeprefix("rediss://").rpartition(":")
    assert host and port.isdigit(), options["redisAddress"]
    ref = options["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in named("Secret", ref["name"])["stringData"], "the example Secret lacks the Redis password"
    assert options.get("backend", "redis") == "redis"
    # Left to KubeRay, which takes the RayCluster's UID: a RayService upgrade's new cluster, or the next RayJob's,
    # must not load the tables of the cluster before it (its dead nodes, its actors).
    assert "externalStorageNamespace" not in options


@pytest.mark.parametrize("cluster", CLUSTER_PARAMS)
def test_the_redis_is_configured_in_the_options_alone(cluster: dict) -> None:
    head = cluster["headGroupSpec"]
    assert not START_PARAMS_REFUSED & head["rayStartParams"].keys()
    assert not HEAD_ENV_REFUSED & {env["name"] for env in ray_container(head).get("env", [])}
    for kind in ("RayService", "RayJob"):
        assert not ANNOTATIONS_REFUSED & the(kind)["metadata"].get("annotations", {}).keys()


def test_the_crd_schema_refuses_a_misspelt_option() -> None:
    service = copy.deepcopy(the("RayService"))
    service["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisAdress"] = "redis:6379"
    assert schema_errors(service)
    service = copy.deepcopy(the("RayService"))
    service["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisPassword"] = "in plain text"
    assert schema_errors(service)


@pytest.mark.parametrize("cluster", CLUSTER_PARAMS)
def test_only_the_on_demand_cpu_group_offers_driver_slots(cluster: dict) -> None:
    """What `ray_cluster.placement.on_driver_group` asks for, and as many per pod as a local CPU node offers."""
    offering = {group["groupName"]: group for group in cluster["workerGroupSpecs"]
                if DRIVER_RESOURCE in group.get("resources", {})}
    assert list(offering) == ["cpu"]
    cpu = offering["cpu"]
    assert float(cpu["resources"][DRIVER_RESOURCE]) == DRIVER_SLOTS_PER_NODE
    assert cpu["labels"]["market"] == "on-demand"  # a spot pod's preemption would take every driver on it
    assert DRIVER_RESOURCE not in cluster["headGroupSpec"].get("resources", {})


def test_the_batch_jobs_driver_runs_in_a_driver_slot() -> None:
    assert json.loads(the("RayJob")["spec"]["entrypointResources"]) == {DRIVER_RESOURCE: 1}
