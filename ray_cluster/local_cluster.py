"""A simulated heterogeneous Ray cluster on one machine: a head, N cheap nodes and M expensive nodes.

    address = start_local_cluster(num_cheap=2)               # in this process; gone when it exits
    address = start_local_cluster(num_cheap=4, detach=True)  # a keeper process holds it (`moedisco cluster start`)
    describe_nodes()          # [{"node_id": ..., "labels": {"gpu_type": "4090"}, "resources": {...}}, ...]
    stop_local_cluster()      # the in-process one, else the detached one

Every node is a separate raylet with one CPU and one logical GPU (one trainer worker fits, as on a single-GPU
machine) and the label `gpu_type` (`4090` cheap, `A100` expensive; key and values from the spec's `resources`). A
logical GPU's node carries `SIMULATED_LABEL`, and a worker on it hides CUDA and trains on the CPU
(`ray_cluster.placement.prepare_worker`); this machine's real GPUs (`local_gpu_count`) go to the expensive nodes
instead, unlabelled, so the fine-tune gets the card and the ledger bills it as real. The head carries
`CONTROL_PLANE_LABEL`, as the KubeRay head does (k8s/), so that drivers are pinned to it, and runs the dashboard. A
detached cluster is owned by a keeper process (`python -m ray_cluster.local_cluster`), which `stop` signals and
which shuts down exactly the nodes it started: never `ray stop`, which would kill other Ray instances on the machine.

The dashboard listens on 127.0.0.1, but the GCS, the raylets and the agents listen on every interface of the machine,
so the cluster requires Ray's token (RAY_AUTH_MODE=token, as Ray's own `ray.init()` does for a cluster it starts),
unless RAY_AUTH_MODE says otherwise: the token of RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, written
there if there is none (`ray_cluster.auth`). The nodes and this process's clients get RAY_AUTH_MODE=token; other
processes' clients of the detached cluster turn it on from the state file (`wants_token`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moedisco.io.atomic import write_atomically
from ray_cluster.auth import AUTH_MODE, enable_token_auth, ensure_token

STATE_FILE = Path(os.environ.get("MOEDISCO_CLUSTER_STATE", Path.home() / ".cache" / "moedisco" / "local_cluster.json"))
DASHBOARD_PORT = 8265
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0

_in_process = None  # the ray.cluster_utils.Cluster this process started, if any
SIMULATED_LABEL = ("moedisco.io/simulated", "true")  # a node whose GPU is logical
CONTROL_PLANE_LABEL = {"moedisco.io/role": "control-plane"}  # the head's, here and in k8s/ (drivers go there)


def local_gpu_count() -> int:
    """NVIDIA GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else the driver's device files (no torch
    import: the cluster starts before anything heavy is loaded)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([device for device in visible.split(",") if device.strip() and device.strip() != "-1"])
    return len(list(Path("/dev").glob("nvidia[0-9]*")))


@dataclass
class LocalClusterSpec:
    num_cheap: int = 2
    num_expensive: int = 1
    label_key: str = "gpu_type"
    cheap_label: str = "4090"
    expensive_label: str = "A100"
    cpus_per_node: float = 1.0
    real_gpus: int = field(default_factory=local_gpu_count)  # this machine's, given to the expensive nodes
    head_cpus: float = 2.0  # Ray starts at most this many worker processes at once on a node
    object_store_mb: int = 150  # the default 30% of RAM per node would reserve ~7 GB each on a 24 GB machine
    dashboard_port: int = DASHBOARD_PORT

    @classmethod
    def from_resources(cls, resources, **overrides) -> LocalClusterSpec:
        """Labels taken from a spec's `resources` section, so the simulated tiers match what the job selects."""
        return cls(label_key=resources.label_key, cheap_label=resources.submodel_tier.label,
                   expensive_label=resources.finetune_tier.label, **overrides)

    def nodes(self) -> list[tuple[dict[str, str], int]]:
        """(labels, GPUs) of every node but the head: a logical GPU each, or this machine's real ones."""
        simulated = dict([SIMULATED_LABEL])
        cheap = [({self.label_key: self.cheap_label, **simulated}, 1)] * self.num_cheap
        if self.real_gpus:
            return cheap + [({self.label_key: self.expensive_label}, self.real_gpus)] * self.num_expensive
        return cheap + [({self.label_key: self.expensive_label, **simulated}, 1)] * self.num_expensive


def _quiet_ray_env() -> None:
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


def _port_is_free(port: int) -> bool:
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
def _environment(**values: str):
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


def _set_up_auth() -> str:
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


def _build_cluster(spec: LocalClusterSpec):
    import ray.util
    from ray.cluster_utils import Cluster

    _quiet_ray_env()
    _set_up_auth()
    memory = spec.object_store_mb * 2**20
    gcs_port = free_port()
    dashboard_port = spec.dashboard_port if _port_is_free(spec.dashboard_port) else free_port()
    head = {"num_cpus": spec.head_cpus, "object_store_memory": memory, "include_dashboard": True,
            "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port, "gcs_server_port": gcs_port,
            "labels": {spec.label_key: "head", **CONTROL_PLANE_LABEL}}
    # Ray's internals (Ray Train's placement-group cleaner, the state API) find "their" cluster by address
    # auto-detection, which picks the newest Ray instance on the machine: with two clusters on one machine they
    # talk to the wrong one. Every process of these nodes inherits RAY_ADDRESS, which auto-detection obeys.
    with _environment(RAY_ADDRESS=f"{ray.util.get_node_ip_address()}:{gcs_port}"):
        cluster = Cluster(initialize_head=True, head_node_args=head)
        for labels, num_gpus in spec.nodes():
            cluster.add_node(num_cpus=spec.cpus_per_node, num_gpus=num_gpus, object_store_memory=memory,
                             labels=labels)
    return cluster


def start_local_cluster(num_cheap: int = 2, num_expensive: int = 1, detach: bool = False,
                        spec: LocalClusterSpec | None = None) -> str:
    """Start the simulated cluster and return its address (`ip:port` of the head's GCS)."""
    global _in_process
    spec = spec or LocalClusterSpec(num_cheap=num_cheap, num_expensive=num_expensive)
    if detach:
        return _start_keeper(spec)
    if _in_process is not None:
        raise RuntimeError("a local cluster is already running in this process; call stop_local_cluster() first")
    _in_process = _build_cluster(spec)
    return _in_process.address


def stop_local_cluster() -> bool:
    """Stop the cluster this process started, else the detached one. Returns whether one was stopped."""
    global _in_process
    if _in_process is not None:
        cluster, _in_process = _in_process, None
        cluster.shutdown()
        return True
    return _stop_keeper()


# --- detached cluster: a keeper process that owns the nodes -------------------------------------------------------


def read_state() -> dict | None:
    if not STATE_FILE.is_file():
        return None
    state = json.loads(STATE_FILE.read_text())
    return state if _alive(state["pid"]) else None


def wants_token(address: str | None) -> bool:
    """Whether `address` is the detached local cluster's, started with token authentication: its clients in other
    processes then send the token without being told (`ray_cluster.auth.connect(token_expected=...)`)."""
    state = read_state()
    return bool(address and state and state["address"] == address and state.get("auth") == "token")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _start_keeper(spec: LocalClusterSpec) -> str:
    if (state := read_state()) is not None:
        raise RuntimeError(f"a local cluster is already running at {state['address']} (pid {state['pid']}); "
                           "`moedisco cluster stop` first")
    STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    STATE_FILE.unlink(missing_ok=True)
    log = open(STATE_FILE.with_suffix(".log"), "w")
    cmd = [sys.executable, "-m", "ray_cluster.local_cluster", "--spec", json.dumps(asdict(spec))]
    # A new session, so the keeper (and the nodes it owns) outlive the terminal that ran `cluster start`.
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if (state := read_state()) is not None:
            return state["address"]
        if process.poll() is not None:
            raise RuntimeError(f"the cluster keeper exited with {process.returncode}; see {log.name}")
        time.sleep(0.5)
    process.terminate()
    raise TimeoutError(f"the local cluster did not start within {START_TIMEOUT_S:.0f}s; see {log.name}")


def _stop_keeper() -> bool:
    state = read_state()
    if state is None:
        return False
    os.kill(state["pid"], signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _alive(state["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(state["pid"]):
        # The keeper's nodes were started with a reaper that kills them when their parent dies.
        os.kill(state["pid"], signal.SIGKILL)
    STATE_FILE.unlink(missing_ok=True)
    return True


def _keep(spec: LocalClusterSpec) -> None:
    """Body of the keeper process: start the nodes, publish the address, hold them until SIGTERM."""
    cluster = _build_cluster(spec)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
    state = {"address": cluster.address, "pid": os.getpid(), "dashboard": f"http://{cluster.webui_url}",
             "auth": auth_mode(), "spec": asdict(spec)}
    write_atomically(STATE_FILE, json.dumps(state, indent=2))
    while not stop["now"]:
        time.sleep(0.5)
    cluster.shutdown()
    STATE_FILE.unlink(missing_ok=True)


# --- inspection ---------------------------------------------------------------------------------------------------


def describe_nodes() -> list[dict]:
    """The alive nodes of the connected cluster with their labels and logical resources."""
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    return [{"node_id": n["NodeID"], "labels": {k: v for k, v in n.get("Labels", {}).items()
                                                 if not k.startswith("ray.io/")},
             "resources": {k: v for k, v in n["Resources"].items() if not k.startswith("node:")}}
            for n in nodes]


def nodes_with_label(label_key: str, label: str) -> list[dict]:
    return [n for n in describe_nodes() if n["labels"].get(label_key) == label]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Keeper process of a detached local simulated cluster.")
    parser.add_argument("--spec", required=True, help="LocalClusterSpec as JSON.")
    _keep(LocalClusterSpec(**json.loads(parser.parse_args().spec)))
