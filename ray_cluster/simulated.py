"""What every simulated local cluster shares, static or autoscaling: its spec, its labels, the head's arguments,
the environment its Ray processes inherit and their token authentication.

    spec = LocalClusterSpec(num_cheap=2)            # ray_cluster.local_cluster starts it
    head = head_node_args(spec, gcs_port=free_port())
    spec = LocalClusterSpec(redis_address="127.0.0.1:6380")   # GCS fault tolerance: the head's tables in that Redis

With `redis_address` (service/scripts/start_redis.sh starts one) the head's GCS keeps its tables in that Redis, as
KubeRay's `gcsFaultToleranceOptions` make it (k8s/): a head killed and started again on the same GCS port and Redis
(`ray_cluster.local_cluster.restart_head`) finds the cluster as it was, and the worker nodes, which wait
`GCS_RECONNECT_TIMEOUT_S` for it, keep their actors and tasks running, the jobs' drivers on the CPU group's nodes
(`DRIVER_RESOURCE`) among them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from moedisco.config.resources import DRIVER_SLOTS_PER_NODE
from ray_cluster.auth import AUTH_MODE, enable_token_auth, ensure_token

DASHBOARD_PORT = 8265

# Each simulated node is a raylet and its agents, processes of this machine: the embedded cluster's groups grow to
# what a laptop holds, not to the manifests' maxReplicas (two experts train at once, the fine-tune gets its node).
LOCAL_MAX_NODES = {"cheap-4090": 2, "cheap-4090-spot": 0, "expensive-a100": 1, "cpu": 1}

SIMULATED_LABEL = ("moedisco.io/simulated", "true")  # a node whose GPU is logical
CONTROL_PLANE_LABEL = {"moedisco.io/role": "control-plane"}  # the head's, here and in k8s/ (the API goes there)
# The CPU group's nodes offer slots for the jobs' drivers (the service's job actor, with its trainers' launcher, event
# queue, Ray Data coordinators and trainers' controllers): a driver takes one, so that a pending driver is demand the
# autoscaler adds a CPU node for, and a node running one is never idle. Here, as in k8s/ (`rayStartParams`).
DRIVER_RESOURCE = "moedisco_driver"
# How long a worker node's raylet waits for a lost GCS before it exits (Ray's default, 60 s, said explicitly; KubeRay
# sets 600 on the workers of a cluster with GCS fault tolerance).
GCS_RECONNECT_TIMEOUT_S = 60


def local_gpu_count() -> int:
    """NVIDIA GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else the driver's device files (no torch
    import: the cluster starts before anything heavy is loaded)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([device for device in visible.split(",") if device.strip() and device.strip() != "-1"])
    return len(list(Path("/dev").glob("nvidia[0-9]*")))


@dataclass
class LocalClusterSpec:
    num_cheap: int = 2  # static: nodes of the cheap tier
    num_expensive: int = 1  # static: nodes of the expensive tier
    num_cpu: int = 1  # static: nodes of the CPU tier (CPU-only work: the split, tokenization, the source model)
    label_key: str = "gpu_type"  # the node label that names the tier
    cheap_label: str = "4090"  # static: the cheap nodes' tier label
    expensive_label: str = "A100"  # static: the expensive nodes' tier label
    cpu_label: str = "cpu"  # static: the CPU nodes' tier label
    cpus_per_node: float = 1.0  # logical CPUs of every node but the head (whole ones when autoscaling)
    real_gpus: int = field(default_factory=local_gpu_count)  # this machine's, given to the expensive nodes
    # The head runs the control plane only (drivers, the API, coordinators: zero-CPU actors and tasks), as KubeRay's
    # head with `num-cpus: "0"`: a task that asks for a CPU never lands on it.
    head_cpus: float = 0.0
    object_store_mb: int = 150  # the default 30% of RAM per node would reserve ~7 GB each on a 24 GB machine
    dashboard_port: int = DASHBOARD_PORT  # the head's dashboard, on 127.0.0.1 (a free port if taken)
    autoscale: bool = False  # a head alone; Ray's autoscaler adds the node groups' nodes (ray_cluster.autoscaling)
    idle_timeout_s: float | None = None  # autoscale: idle seconds before a node goes; unset = resources' default
    # autoscale: most nodes of a group at once, by group; a group not named: its `max_nodes` (the manifests')
    max_nodes: dict[str, int] = field(default_factory=lambda: dict(LOCAL_MAX_NODES))
    redis_address: str | None = None  # static: host:port of a Redis the GCS keeps its tables in (fault tolerance)
    # GCS fault tolerance: the prefix of the cluster's keys in that Redis, one per cluster (a head started again
    # with the same one finds the cluster; a new cluster on the same Redis must not)
    external_storage_namespace: str = field(default_factory=lambda: f"moedisco-{uuid.uuid4().hex[:12]}")

    @classmethod
    def from_resources(cls, resources, **overrides) -> LocalClusterSpec:
        """Labels taken from a spec's `resources` section, so the simulated tiers match what the job selects."""
        return cls(label_key=resources.label_key, cheap_label=resources.submodel_tier.label,
                   expensive_label=resources.finetune_tier.label, cpu_label=resources.cpu_tier.label, **overrides)

    def nodes(self) -> list[tuple[dict[str, str], int]]:
        """(labels, GPUs) of every node but the head: a logical GPU each, or this machine's real ones."""
        simulated = dict([SIMULATED_LABEL])
        cheap = [({self.label_key: self.cheap_label, **simulated}, 1)] * self.num_cheap
        cpu = [({self.label_key: self.cpu_label}, 0)] * self.num_cpu
        if self.real_gpus:
            return cheap + [({self.label_key: self.expensive_label}, self.real_gpus)] * self.num_expensive + cpu
        return cheap + [({self.label_key: self.expensive_label, **simulated}, 1)] * self.num_expensive + cpu

    def custom_resources(self, labels: dict[str, str]) -> dict[str, float]:
        """A node's resources besides CPUs and GPUs: a CPU node's driver slots."""
        return {DRIVER_RESOURCE: DRIVER_SLOTS_PER_NODE} if labels.get(self.label_key) == self.cpu_label else {}

    def gcs_ft_env(self) -> dict[str, str]:
        """The head's environment for GCS fault tolerance (Ray reads RAY_REDIS_ADDRESS when a head starts), and the
        workers' patience with a lost GCS; empty without a Redis."""
        if self.redis_address is None:
            return {}
        return {"RAY_REDIS_ADDRESS": self.redis_address,
                "RAY_external_storage_namespace": self.external_storage_namespace,
                "RAY_gcs_rpc_server_reconnect_timeout_s": str(GCS_RECONNECT_TIMEOUT_S)}


def quiet_ray_env() -> None:
    # Set before the raylets start so every worker inherits them.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # already the default in 2.60; explicit for older Rays
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")  # the dashboard's Train view lists the trainers
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Ray Train's controller polls its workers every 2 s by default, so a trainer's start and end each wait up to
    # that long; and it starts a preemption watcher (one more process per trainer) that has nothing to watch on
    # nodes that are processes of this machine.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def port_is_free(port: int) -> bool:
    # Another Ray cluster on this machine may hold the dashboard's usual port; ours then takes a free one.
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


# Ports Ray's components take by default. An ephemeral port the OS hands out can be one of them (52365 is in
# Linux's ephemeral range), and Ray then refuses to start: "is trying to use a port number ... used by other
# components".
RAY_DEFAULT_PORTS = frozenset({6379, 8265, 10001, 52365})


def free_port() -> int:
    """A port free on this machine now that none of Ray's components takes by default."""
    while True:
        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        if port not in RAY_DEFAULT_PORTS:
            return port


@contextlib.contextmanager
def environment(**values: str):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def auth_mode() -> str:
    """The local cluster's Ray authentication: `token` unless RAY_AUTH_MODE names another mode."""
    return os.environ.get(AUTH_MODE, "").strip().lower() or "token"


def set_up_auth() -> str:
    """Token authentication for the nodes about to start and for this process's clients; returns the mode."""
    mode = auth_mode()
    if mode == "token":
        ensure_token()
        enable_token_auth()  # in os.environ: the nodes inherit it, and this process connects with the token
    else:
        import logging

        logging.getLogger(__name__).warning(
            "the local Ray cluster starts with %s=%s: its GCS and raylets listen on every interface of this machine, "
            "and anyone who reaches them can run code here", AUTH_MODE, mode)
    return mode


def head_node_args(spec: LocalClusterSpec, gcs_port: int) -> dict:
    dashboard_port = spec.dashboard_port if port_is_free(spec.dashboard_port) else free_port()
    return {"num_cpus": spec.head_cpus, "object_store_memory": spec.object_store_mb * 2**20,
            "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port,
            "gcs_server_port": gcs_port, "labels": {spec.label_key: "head", **CONTROL_PLANE_LABEL}}


