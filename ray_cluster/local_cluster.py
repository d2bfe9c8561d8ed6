"""A simulated heterogeneous Ray cluster on one machine: a head and, static, N cheap, M expensive and K CPU nodes, or
autoscaling, the nodes Ray's autoscaler adds as work asks (what `moedisco cluster start` and the Ray runner start).

    address = start_local_cluster(num_cheap=2)               # static, in this process; gone when it exits
    address = start_local_cluster(spec=LocalClusterSpec(autoscale=True))  # a head; nodes come and go on demand
    address = start_local_cluster(spec=spec, detach=True)    # a keeper process holds it (`moedisco cluster start`)
    describe_nodes()          # [{"node_id": ..., "group": "", "labels": {"gpu_type": "4090"}, "resources": {...}}, ...]
    kill_head(); start_head() # static, in this process: a head crash and its restart (GCS fault tolerance: redis_address)
    stop_local_cluster()      # the in-process one, else the detached one

Every node is a separate raylet with one CPU and one logical GPU (one trainer worker fits, as on a single-GPU
machine), a CPU node none, and the label `gpu_type` (`4090` cheap, `A100` expensive, `cpu`; key and values from the
spec's `resources`); the head offers no CPU, so only the control plane's zero-CPU actors and tasks run there. A
logical GPU's node carries `SIMULATED_LABEL`, and a worker on it hides CUDA and trains on the CPU
(`ray_cluster.placement.prepare_worker`); this machine's real GPUs (`local_gpu_count`) go to the expensive nodes
instead, unlabelled, so the fine-tune gets the card and the ledger bills it as real. The head carries
`CONTROL_PLANE_LABEL`, as the KubeRay head does (k8s/), so that the API is pinned to it, and runs the dashboard; a
CPU node offers the jobs' drivers their slots (`DRIVER_RESOURCE`), so that a job outlives a head restart. A
detached cluster is owned by a keeper process (`python -m ray_cluster.local_cluster`), which `stop` signals and
which shuts down exactly the nodes it started: never `ray stop`, which would kill other Ray instances on the machine.
An autoscaling cluster (`autoscale=True`) starts the head alone; Ray's autoscaler then adds and removes the nodes of
the node groups (`resources.node_groups`), as it does KubeRay's pods (`ray_cluster.autoscaling`).

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
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from moedisco.io.atomic import write_atomically
from ray_cluster.simulated import (  # noqa: F401 - the labels, DRIVER_RESOURCE, free_port: this module's API too
    CONTROL_PLANE_LABEL,
    DRIVER_RESOURCE,
    LOCAL_MAX_NODES,
    SIMULATED_LABEL,
    LocalClusterSpec,
    auth_mode,
    environment,
    free_port,
    head_node_args,
    quiet_ray_env,
    set_up_auth,
)

STATE_FILE = Path(os.environ.get("MOEDISCO_CLUSTER_STATE", Path.home() / ".cache" / "moedisco" / "local_cluster.json"))
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0

_in_process = None  # the ray.cluster_utils.Cluster this process started, if any
_head_args: tuple[LocalClusterSpec, dict] | None = None  # its spec and its head's arguments, to start it again


def _build_cluster(spec: LocalClusterSpec):
    """A `ray.cluster_utils.Cluster` with every node started, or with `spec.autoscale` an autoscaling one; both
    have `address`, `webui_url` and `shutdown()`."""
    global _head_args
    if spec.autoscale:
        if spec.redis_address is not None:
            raise ValueError("redis_address: GCS fault tolerance is for a static local cluster (autoscale=False)")
        from ray_cluster.autoscaling import AutoscalingLocalCluster

        return AutoscalingLocalCluster(spec)
    from ray.cluster_utils import Cluster

    quiet_ray_env()
    set_up_auth()
    memory = spec.object_store_mb * 2**20
    head = head_node_args(spec, free_port())
    with _cluster_env(spec, head):
        cluster = Cluster(initialize_head=True, head_node_args=head)
        for labels, num_gpus in spec.nodes():
            cluster.add_node(num_cpus=spec.cpus_per_node, num_gpus=num_gpus, object_store_memory=memory,
                             labels=labels, resources=spec.custom_resources(labels))
    _head_args = (spec, head)
    return cluster


def _cluster_env(spec: LocalClusterSpec, head: dict):
    import ray.util

    # Ray's internals (Ray Train's placement-group cleaner, the state API) find "their" cluster by address
    # auto-detection, which picks the newest Ray instance on the machine: with two clusters on one machine they
    # talk to the wrong one. Every process of these nodes inherits RAY_ADDRESS, which auto-detection obeys.
    address = f"{ray.util.get_node_ip_address()}:{head['gcs_server_port']}"
    return environment(RAY_ADDRESS=address, **spec.gcs_ft_env())


def kill_head() -> list[int]:
    """SIGKILL every process of the head of the static cluster this process started (its GCS, raylet, dashboard,
    monitor and what they started), as a crashed head pod; returns their pids. With GCS fault tolerance
    (`LocalClusterSpec.redis_address`) the worker nodes wait for it and `start_head` brings it back; without, they
    follow it."""
    import psutil
    import ray

    if _in_process is None or _head_args is None or _in_process.head_node is None:
        raise RuntimeError("no static local cluster with a head runs in this process")
    if ray.is_initialized():  # a driver dies with its raylet, the head's here
        raise RuntimeError("this process is connected to Ray through the head: ray.shutdown() before kill_head()")
    head = _in_process.head_node
    processes = [psutil.Process(info.process.pid) for infos in head.all_processes.values() for info in infos
                 if info.process.poll() is None]
    processes += [child for process in list(processes) for child in _descendants(process)]
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(processes, timeout=STOP_TIMEOUT_S)
    for infos in head.all_processes.values():
        for info in infos:
            info.process.wait()  # reap the direct children: no zombie holds the ports
    _in_process.head_node = None
    return [process.pid for process in processes]


def _descendants(process) -> list:
    import psutil

    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def start_head() -> str:
    """Start the head `kill_head` killed again, on the same GCS port and dashboard port and, with GCS fault
    tolerance, the same Redis, where it finds the cluster's session, nodes, actors and placement groups; returns
    its node id."""
    if _in_process is None or _head_args is None or _in_process.head_node is not None:
        raise RuntimeError("no static local cluster whose head was killed runs in this process")
    spec, head = _head_args
    with _cluster_env(spec, head):
        return _in_process.add_node(**head).node_id


def restart_head() -> str:
    """`kill_head` then `start_head`: the new head's node id."""
    kill_head()
    return start_head()


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
    global _in_process, _head_args
    if _in_process is not None:
        cluster, _in_process, _head_args = _in_process, None, None
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
    cmd = [sys.executable, "-m", "ray_cluster.local_cluster", "--spec", json.dumps(asdict(spec))]
    with open(STATE_FILE.with_suffix(".log"), "w") as log:
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
        # The keeper's nodes were started with a reaper that kills them when their parent dies; an autoscaler's
        # nodes are not (the autoscaler starts them), but like every process of the cluster they are in the
        # keeper's session, which is the cluster's alone.
        os.kill(state["pid"], signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(state["pid"], signal.SIGKILL)
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
    """The alive nodes of the connected cluster with their node group (`ray.io/node-group`, empty when none), their
    labels but Ray's own and their logical resources."""
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    return [{"node_id": n["NodeID"], "group": n.get("Labels", {}).get("ray.io/node-group", ""),
             "labels": {k: v for k, v in n.get("Labels", {}).items() if not k.startswith("ray.io/")},
             "resources": {k: v for k, v in n["Resources"].items() if not k.startswith("node:")}}
            for n in nodes]


def nodes_with_label(label_key: str, label: str) -> list[dict]:
    return [n for n in describe_nodes() if n["labels"].get(label_key) == label]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Keeper process of a detached local simulated cluster.")
    parser.add_argument("--spec", required=True, help="LocalClusterSpec as JSON.")
    _keep(LocalClusterSpec(**json.loads(parser.parse_args().spec)))
