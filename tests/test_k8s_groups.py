"""The worker groups of k8s/ against the job spec's tiers and node groups (moedisco/config/resources.py): the GPU
tiers, the cpu group for CPU-only work, a head that offers Ray no CPU, and the groups the billed cost prices. The
manifests, their CRD schema check and the helpers are those of tests/test_k8s_manifests.py.

    pytest tests/test_k8s_groups.py -q
"""

from __future__ import annotations

import pytest
import yaml

from moedisco.config.resources import CPU_DEVICE_TYPE, ResourcesConfig
from tests.test_k8s_manifests import CLUSTER_PARAMS, CLUSTERS, GPU, gpu_groups, job_spec_text, ray_container, the

RESOURCES = ResourcesConfig()
TIERS = (RESOURCES.submodel_tier, RESOURCES.finetune_tier, RESOURCES.cpu_tier)
GPU_NODE = {"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-4090"}  # GPU Feature Discovery labels every GPU node
SPOT_NODE = {"cloud.google.com/gke-spot": "true"}


def node_admits(pod: dict, node_labels: dict[str, str]) -> bool:
    """Whether the pod's nodeSelector and required node affinity let it onto a node with these labels."""
    if not pod.get("nodeSelector", {}).items() <= node_labels.items():
        return False
    required = pod.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    if not required:
        return True

    def holds(expression: dict) -> bool:
        key, values = expression["key"], expression.get("values", [])
        return {"In": node_labels.get(key) in values, "NotIn": node_labels.get(key) not in values,
                "Exists": key in node_labels, "DoesNotExist": key not in node_labels}[expression["operator"]]

    # The terms are ORed, the expressions of a term ANDed.
    return any(all(map(holds, term.get("matchExpressions", []))) for term in required["nodeSelectorTerms"])


def group_of_tier(cluster: dict, label: str) -> dict:
    (group,) = [g for g in cluster["workerGroupSpecs"] if g["labels"].get(RESOURCES.label_key) == label]
    return group


@pytest.mark.parametrize("cluster", CLUSTER_PARAMS)
def test_gpu_tiers(cluster: dict) -> None:
    tiers = gpu_groups(cluster)
    assert set(tiers) == {"4090", "A100"}
    assert tiers["4090"]["groupName"] == "cheap-4090" and tiers["4090"]["maxReplicas"] >= 1
    assert tiers["A100"]["groupName"] == "expensive-a100" and tiers["A100"]["maxReplicas"] == 1
    for tier, group in tiers.items():
        resources = ray_container(group)["resources"]
        assert int(resources["limits"].get(GPU, 0)) >= 1, f"{tier}: no {GPU} limit"
        assert resources.get("requests", {}).get(GPU, resources["limits"][GPU]) == resources["limits"][GPU]
        spec = group["template"]["spec"]
        assert spec.get("nodeSelector") or spec.get("affinity"), f"{tier}: could land on any GPU node"
        assert any(t.get("key") == GPU for t in spec.get("tolerations", [])), f"{tier}: does not tolerate {GPU}"
    assert GPU not in ray_container(cluster["headGroupSpec"])["resources"].get("limits", {}), "the head has a GPU"


@pytest.mark.parametrize("cluster", CLUSTER_PARAMS)
def test_the_head_offers_ray_no_cpu(cluster: dict) -> None:
    # A CPU task on the head (the source model in fp32) could run it out of memory and take the control plane down.
    assert cluster["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"


def test_the_batch_jobs_driver_takes_a_driver_slot_of_the_cpu_group() -> None:
    # Without entrypoint resources Ray would run the driver on the head, and a head restart would end the job; a
    # CPU asked would take one from the CPU-tier work. A driver slot only the cpu group offers puts it there.
    import json

    from ray_cluster.local_cluster import DRIVER_RESOURCE

    job = the("RayJob")["spec"]
    assert not [key for key in ("entrypointNumCpus", "entrypointNumGpus") if job.get(key)]
    assert json.loads(job["entrypointResources"]) == {DRIVER_RESOURCE: 1}
    offering = [group["groupName"] for group in job["rayClusterSpec"]["workerGroupSpecs"]
                if float(group.get("resources", {}).get(DRIVER_RESOURCE, 0)) >= 1]
    assert offering == ["cpu"]


@pytest.mark.parametrize("cluster", CLUSTER_PARAMS)
def test_every_worker_group_carries_a_tier_of_the_config(cluster: dict) -> None:
    labels = {tier.label for tier in TIERS}
    carried = {g["groupName"]: g.get("labels", {}).get(RESOURCES.label_key) for g in cluster["workerGroupSpecs"]}
    for name, label in carried.items():
        assert label in labels, f"{name}: {RESOURCES.label_key}={label} is no tier's label {sorted(labels)}"
    # A tier without a group would leave its stages waiting for nodes until capacity_timeout_s.
    assert labels <= set(carried.values()), f"no worker group for {labels - set(carried.values())}"


@pytest.mark.parametrize("cluster", CLUSTER_PARAMS)
def test_the_cpu_group_has_no_gpu_and_stays_off_gpu_and_spot_nodes(cluster: dict) -> None:
    from ray_cluster.placement import worker_resources

    group = group_of_tier(cluster, RESOURCES.cpu_tier.label)
    assert group["groupName"] == "cpu" and group["labels"]["market"] == "on-demand"
    spec = group["template"]["spec"]
    for container in spec["containers"]:
        for kind in ("requests", "limits"):
            assert GPU not in container.get("resources", {}).get(kind, {}), f"the cpu group's {kind} name a GPU"
    assert worker_resources(RESOURCES.cpu_tier) == {"CPU": 1}, "a cpu-tier worker would wait for a GPU"
    assert int(ray_container(group)["resources"]["limits"]["cpu"]) >= 1
    assert not [t for t in spec.get("tolerations", []) if t.get("key") == GPU], "tolerates the GPU nodes' taint"
    assert node_admits(spec, {"kubernetes.io/os": "linux"})
    assert not node_admits(spec, GPU_NODE), "a CPU pod on a GPU node keeps it from scaling down"
    assert not node_admits(spec, SPOT_NODE), "an on-demand group on a spot node"
    for gpu_group in gpu_groups(cluster).values():  # the GPU groups' own nodes, whichever labels they select
        assert not node_admits(spec, gpu_group["template"]["spec"].get("nodeSelector", {})), gpu_group["groupName"]


def test_job_spec_and_ray_labels_agree_with_moedisco_config() -> None:
    config = pytest.importorskip("moedisco.config.loading")
    spec = config.build_spec(yaml.safe_load(job_spec_text()))
    resources = spec.resources
    for cluster in CLUSTERS:
        labels = {g["groupName"]: g["labels"].get(resources.label_key) for g in cluster["workerGroupSpecs"]}
        assert labels == {"cheap-4090": resources.submodel_tier.label, "cheap-4090-spot": resources.submodel_tier.label,
                          "expensive-a100": resources.finetune_tier.label, "cpu": resources.cpu_tier.label}


@pytest.mark.parametrize("cluster", CLUSTER_PARAMS)
def test_the_node_groups_priced_are_the_manifests_worker_groups(cluster: dict) -> None:
    """`resources.node_groups` (what the billed cost prices, and the autoscaling local cluster starts) declares the
    worker groups of k8s/: names, tier and market labels, sizes, idle timeouts and accelerators."""
    default_idle = cluster["autoscalerOptions"]["idleTimeoutSeconds"]
    assert RESOURCES.idle_timeout_s == default_idle
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == set(RESOURCES.node_groups)
    for name, declared in RESOURCES.node_groups.items():
        group = groups[name]
        assert group["labels"][RESOURCES.label_key] == declared.tier, name
        assert group["labels"]["market"] == declared.market, name
        assert (group["minReplicas"], group["maxReplicas"]) == (declared.min_nodes, declared.max_nodes), name
        assert group.get("idleTimeoutSeconds", default_idle) == RESOURCES.idle_timeout(name), name
        assert group.get("priority", 0) == declared.priority, name
        gpus = ray_container(group)["resources"]["limits"].get(GPU)
        assert gpus == (None if declared.device_type == CPU_DEVICE_TYPE else declared.num_devices), name
    assert RESOURCES.node_groups["cheap-4090-spot"].priority > RESOURCES.node_groups["cheap-4090"].priority


def gib(quantity: str) -> float:
    units = {"Gi": 2**30, "Mi": 2**20, "G": 1e9, "M": 1e6}
    unit = next(unit for unit in units if quantity.endswith(unit))
    return float(quantity[: -len(unit)]) * units[unit]


@pytest.mark.parametrize("cluster", CLUSTER_PARAMS)
def test_every_pod_holds_the_memory_the_planner_assumes(cluster: dict) -> None:
    """The memory planner refuses a stage against a tier's `node_memory_gb`, whose defaults are these pods'."""
    for group in cluster["workerGroupSpecs"]:
        device = RESOURCES.node_groups[group["groupName"]].device_type
        tier = next(tier for tier in TIERS if tier.device_type == device)
        limit = gib(ray_container(group)["resources"]["limits"]["memory"])
        assert limit >= tier.node_memory_gb_or_default() * 1e9, f"{group['groupName']}: {limit / 1e9:.1f} GB < the planner's"
