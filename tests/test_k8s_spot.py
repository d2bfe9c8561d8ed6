"""The KubeRay manifests' spot worker group (issue 15): a spot 4090 group beside the on-demand one, none for the A100
tier, and on every worker group a preemption notice (a Ray drain) that fits the pod's grace period (issue 30). The
manifests, their CRD schema check and the helpers are those of tests/test_k8s_manifests.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import ray

from tests.test_k8s_manifests import CLUSTER_PARAMS, gpu_groups, ray_container

RAYLET = Path(ray.__file__).parent / "core" / "src" / "ray" / "raylet" / "raylet"
SPOT_SELECTORS = {"cloud.google.com/gke-spot": "true", "eks.amazonaws.com/capacityType": "SPOT"}


@pytest.mark.parametrize("cluster", CLUSTER_PARAMS)
def test_a_spot_4090_group_beside_the_on_demand_one_and_no_spot_a100(cluster: dict) -> None:
    spot, on_demand = gpu_groups(cluster, "spot"), gpu_groups(cluster, "on-demand")
    assert set(spot) == {"4090"}, "only the cheap tier runs on spot capacity"
    group = spot["4090"]
    assert group["groupName"] == "cheap-4090-spot" and group["minReplicas"] == 0 and group["maxReplicas"] >= 1
    spec, twin = group["template"]["spec"], on_demand["4090"]["template"]["spec"]
    selector = {key: value for key, value in spec["nodeSelector"].items() if key in SPOT_SELECTORS}
    assert selector and all(SPOT_SELECTORS[key] == value for key, value in selector.items())
    tolerated = {(t["key"], t.get("value")) for t in spec["tolerations"]}
    assert set(selector.items()) <= tolerated, "the spot node pool's taint is not tolerated"
    for other in on_demand.values():  # on-demand pods never land on spot nodes
        assert not set(other["template"]["spec"]["nodeSelector"]) & set(SPOT_SELECTORS)
        assert not {t["key"] for t in other["template"]["spec"]["tolerations"]} & set(SPOT_SELECTORS)
    # Same pod as the on-demand group's but for where it runs and the notice: a drain, within the grace period.
    assert ray_container(group)["resources"] == ray_container(on_demand["4090"])["resources"]
    assert spec["nodeSelector"]["nvidia.com/gpu.product"] == twin["nodeSelector"]["nvidia.com/gpu.product"]
    assert drain_timing(group)[2] <= 15, "GKE gives a spot node's pods 15 s of its notice"


def drain_timing(group: dict) -> tuple[int, int, int]:
    """(the drain's deadline, the most seconds the preStop keeps the pod, the grace period) of a worker group,
    whose preStop drains its Ray node as a preemption and then waits while a Ray Train worker runs there."""
    command = ray_container(group)["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert "ray drain-node ${id:+--node-id $id} --reason DRAIN_NODE_REASON_PREEMPTION" in command
    # The node's id, from the line this Ray's raylet logs as it starts, spares the drain a driver's connection.
    (logged,) = re.findall(r"grep -som1 '(Setting node ID) node_id=\[0-9a-f\]\*'", command)
    assert logged.encode() in RAYLET.read_bytes()
    (pattern,) = re.findall(r"grep -qs '([^']+)' /proc/\[0-9\]\*/cmdline", command)
    # A Ray Train worker's process title; the pattern never matches the preStop's own command line.
    assert re.search(pattern, "ray::RayTrainWorker") and not re.search(pattern, command)
    deadline = int(re.search(r"--deadline-remaining-seconds (\d+)", command).group(1))
    kept = int(re.search(r"seq (\d+)", command).group(1))
    return deadline, kept, group["template"]["spec"]["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("cluster", CLUSTER_PARAMS)
def test_every_worker_group_drains_on_sigterm_within_its_grace_period(cluster: dict) -> None:
    """On-demand pods go too (node upgrades, evictions): every worker group's preStop drains its node, so a trainer
    there checkpoints and restarts as a preemption; on-demand groups, which no cloud hurries, get longer."""
    timings = {group["groupName"]: drain_timing(group) for group in cluster["workerGroupSpecs"]}
    assert all(deadline < kept < grace for deadline, kept, grace in timings.values())
    spot = timings.pop("cheap-4090-spot")
    assert timings and all(deadline > spot[0] for deadline, _, _ in timings.values())
