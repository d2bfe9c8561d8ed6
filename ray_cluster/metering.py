"""The worker nodes' lives as the cloud bills them: from the autoscaler's request for a node to the node's end.

    meter = NodeMeter(spec.resources).start(watch_launches=True)   # with an autoscaler: a thread of this driver
    meter.poll(); meter.lives()                 # [NodeLife(node=..., group="cheap-4090", requested_at=..., ...)]
    meter.stop()

Ray's node table (`ray.util.state.list_nodes`, the same on KubeRay and on the local clusters) gives each node's start
and end, its labels (`ray.io/node-group`, `ray.io/market-type`, the tier label) and its resources. The head, the
control plane (`CONTROL_PLANE_LABEL`), is not a worker node and is not billed to jobs. When an autoscaler v2 runs,
its launch requests (`ray_cluster.autoscaling.launch_requests`) say when a node of a group was asked for: a node is
taken to be the oldest request of its group not yet matched that came before it started and at most `MAX_BOOT_S`
before, so that the boot and image pull are billed; a request the autoscaler gave up on (failed) matches nothing.
A request is only seen while it is pending: the meter's thread reads them every `poll_s`, and a request that comes and
goes between two reads is billed from the node's start. Without an autoscaler (a static cluster) there is no thread,
and nodes are billed from their start. The node table is read when asked (`poll`: the runner does at each stage's
end), not in the thread: Ray serves it through the dashboard, whose work a 2-core machine feels.
"""

from __future__ import annotations

import logging
import threading

import ray

from moedisco.config.resources import ResourcesConfig
from moedisco.planning.billing import NodeLife, price_group
from ray_cluster.local_cluster import CONTROL_PLANE_LABEL, DRIVER_RESOURCE, SIMULATED_LABEL

log = logging.getLogger(__name__)
MAX_BOOT_S = 1800.0  # a VM and a multi-GB image: longer than this, the request was for another node


def _is_control_plane(node) -> bool:
    labels = node.labels or {}
    return node.is_head_node or all(labels.get(key) == value for key, value in CONTROL_PLANE_LABEL.items())


class NodeMeter:
    def __init__(self, resources: ResourcesConfig, poll_s: float = 2.0):
        self.resources, self.poll_s = resources, poll_s
        self.requests: dict[str, list[float]] = {}  # node group -> unmatched launch request times
        self.seen: set[tuple[str, float, int]] = set()  # (group, request time, index) already queued
        self.requested: dict[str, float] = {}  # node id -> its request time
        self.nodes: dict[str, NodeLife] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, watch_launches: bool) -> NodeMeter:
        """Read the nodes now; with `watch_launches` (an autoscaler runs), read its launch requests every `poll_s`
        in a thread until `stop`."""
        self.try_poll()
        if watch_launches:
            self.thread = threading.Thread(target=self._loop, name="moedisco-node-meter", daemon=True)
            self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.try_poll()

    def _loop(self) -> None:
        while not self.stopping.wait(self.poll_s):
            with self.lock:
                self._read_launch_requests()

    def try_poll(self) -> None:
        try:
            self.poll()
        except Exception as error:  # noqa: BLE001 - a missed poll costs precision, never the job (its error is
            # the one to see)
            log.debug("node meter poll failed: %s", error)

    def lives(self) -> list[NodeLife]:
        with self.lock:
            return list(self.nodes.values())

    def poll(self) -> None:
        """Read the autoscaler's pending launches, then the node table."""
        if not ray.is_initialized():
            return
        from ray.util.state import list_nodes

        with self.lock:  # the poll thread and `node_lives()` both poll
            self._read_launch_requests()
            # The connected cluster's, never auto-detected: another Ray may run on the same machine.
            nodes = list_nodes(address=ray.get_runtime_context().gcs_address, detail=True, limit=10_000,
                               raise_on_missing_output=False)
            for node in nodes:
                if not _is_control_plane(node) and node.start_time_ms:
                    self.nodes[node.node_id] = self._life(node)

    def _life(self, node) -> NodeLife:
        labels = node.labels or {}
        resources = {key: float(value) for key, value in (node.resources_total or {}).items()
                     if key in ("CPU", "GPU", "memory", DRIVER_RESOURCE)}  # what a use's share is of
        group = price_group(self.resources, labels)
        started = node.start_time_ms / 1000.0
        if node.node_id not in self.requested:
            self.requested[node.node_id] = self._match_request(group, started)
        return NodeLife(node=node.node_id, group=group, started_at=started, requested_at=self.requested[node.node_id],
                        ended_at=node.end_time_ms / 1000.0 if node.state == "DEAD" and node.end_time_ms else None,
                        resources=resources, simulated=labels.get(SIMULATED_LABEL[0]) == SIMULATED_LABEL[1])

    def _match_request(self, group: str, started: float) -> float:
        earlier = [at for at in self.requests.get(group, []) if started - MAX_BOOT_S <= at <= started]
        if not earlier:
            return started
        self.requests[group].remove(min(earlier))
        return min(earlier)

    def _read_launch_requests(self) -> None:
        try:
            from ray_cluster.autoscaling import launch_requests

            requests = launch_requests(ray.get_runtime_context().gcs_address)
        except Exception:  # noqa: BLE001 - no autoscaler v2 here (a static cluster): nodes bill from their start
            return
        self.note_requests(requests)

    def note_requests(self, requests: list[dict]) -> None:
        """Queue the pending launch requests not seen before; drop those the autoscaler gave up on."""
        for request in requests:
            group, at = request["node_type"], float(request["request_ts_s"])
            for index in range(request["count"]):
                key = (group, at, index)
                if request["state"] == "FAILED":  # given up: no node will come of it
                    if at in self.requests.get(group, []) and key in self.seen:
                        self.requests[group].remove(at)
                    self.seen.add(key)
                elif key not in self.seen:
                    self.seen.add(key)
                    self.requests.setdefault(group, []).append(at)


def read_node_lives(resources: ResourcesConfig) -> list:
    """The worker nodes' lives now (one poll): for a process that holds no meter."""
    meter = NodeMeter(resources)
    meter.poll()
    return meter.lives()


__all__ = ["NodeMeter", "read_node_lives"]
