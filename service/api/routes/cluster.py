"""The cluster as the autoscaler shapes it: worker nodes by node group, and the launches not up yet.

    GET /v1/cluster    {"connected": true, "nodes": {"cheap-4090": 2, "cpu": 1}, "launching": {"expensive-a100": 1},
                        "autoscaling": true}

Any user may read it (a job waiting for nodes is explained by it); it holds counts only, never which job holds a
node. The head (the control plane) is not a worker node and is not counted. A service without a Ray cluster (its
tests' app) says so, `connected: false`, rather than failing.
"""

from __future__ import annotations

from collections import Counter

from fastapi import APIRouter

from service.schemas import ClusterPublic

router = APIRouter(tags=["cluster"])


@router.get("/cluster")
def cluster() -> ClusterPublic:
    """Worker nodes alive by node group, and those the autoscaler launches."""
    import ray

    if not ray.is_initialized():
        return ClusterPublic(connected=False, nodes={}, launching={}, autoscaling=False)
    from ray_cluster.autoscaling import launch_requests, pending_nodes
    from ray_cluster.local_cluster import CONTROL_PLANE_LABEL, describe_nodes
    from ray_cluster.placement import cluster_autoscales

    gcs = ray.get_runtime_context().gcs_address
    workers = [node for node in describe_nodes()
               if not CONTROL_PLANE_LABEL.items() <= node["labels"].items()]
    starting = pending_nodes(gcs)
    requested = Counter()
    for request in launch_requests(gcs):
        if request["state"] == "PENDING":
            requested[request["node_type"]] += request["count"]
    requested.update(node["node_type"] for node in starting)
    return ClusterPublic(connected=True, nodes=dict(Counter(node["group"] or "-" for node in workers)),
                         launching=dict(requested),
                         autoscaling=cluster_autoscales())
