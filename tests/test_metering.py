"""The node meter's reading of the autoscaler's launch requests (ray_cluster.metering): which request a node that
starts was launched for, so that its boot is billed from the request, and only then."""

from moedisco.config.resources import ResourcesConfig
from ray_cluster.metering import MAX_BOOT_S, NodeMeter


def request(at: float, state: str = "PENDING", count: int = 1, group: str = "cheap-4090") -> dict:
    return {"node_type": group, "count": count, "state": state, "request_ts_s": at}


def test_a_node_is_billed_from_the_oldest_pending_request_of_its_group_and_a_request_serves_one_node():
    meter = NodeMeter(ResourcesConfig())
    meter.note_requests([request(100.0, count=2), request(90.0, group="expensive-a100")])
    meter.note_requests([request(100.0, count=2)])  # seen again on the next poll: not queued twice
    assert meter._match_request("cheap-4090", 130.0) == 100.0
    assert meter._match_request("cheap-4090", 131.0) == 100.0
    assert meter._match_request("cheap-4090", 132.0) == 132.0  # both taken: this node's request was not seen
    assert meter._match_request("expensive-a100", 80.0) == 80.0  # a request after the start is another node's


def test_a_failed_or_stale_request_is_not_a_later_nodes_boot():
    meter = NodeMeter(ResourcesConfig())
    meter.note_requests([request(1000.0), request(2000.0)])
    meter.note_requests([request(1000.0, state="FAILED"), request(2000.0)])
    assert meter._match_request("cheap-4090", 8000.0) == 8000.0  # 2000 s is older than a boot can be
    assert meter._match_request("cheap-4090", 2000.0 + MAX_BOOT_S) == 2000.0
