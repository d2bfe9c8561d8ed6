"""The KubeRay manifests' spot worker group (issue 15): a spot 4090 group beside the on-demand one, none for the A100
tier, and a preemption notice (a Ray drain) that fits the pod's grace period. The manifests, their CRD schema check
and the helpers are those of tests/test_k8s_manifests.py."""

from __future__ import annotations

import re

import pytest

from tests.test_k8s_manifests import CLUSTER_PARAMS, gpu_groups, ray_container

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
    (command,) = [ray_container(group)["lifecycle"]["preStop"]["exec"]["command"][-1]]
    assert "ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION" in command
    waits = [int(n) for n in re.findall(r"(?:deadline-remaining-seconds|sleep) (\d+)", command)]
    assert len(waits) == 2 and max(waits) < spec["terminationGracePeriodSeconds"]
