"""A simulated Ray cluster that autoscales: a head alone, and Ray's own autoscaler v2 adding the nodes of the node
groups (`resources.node_groups`) while work asks for their labels, and removing them when idle.

    spec = LocalClusterSpec(autoscale=True, max_nodes={"cheap-4090": 2}, idle_timeout_s=15)
    address = start_local_cluster(spec=spec)     # ray_cluster.local_cluster: the head only, dashboard on 127.0.0.1
    ray.get(work.options(label_selector={"gpu_type": "4090"}, num_gpus=1).remote())   # a cheap-4090 node comes
    launch_requests(address)      # [{"node_type": "cheap-4090", "count": 1, "state": "PENDING", "request_ts_s": ...}]
    stop_local_cluster()          # the head, the autoscaler and every node it started

The head starts with an autoscaling config (written here) whose provider is `LocalNodeProvider`, Ray's fake
multi-node provider declared as an `external` one: the package ships the provider but not the `example.yaml` that
its own `fake_multinode` type and `ray.cluster_utils.AutoscalingCluster` read. The autoscaler runs in the head's
monitor process and starts each node there, as a raylet of this machine with the group's logical GPUs and labels:
the tier label, `SIMULATED_LABEL`, and the `ray.io/node-group` and `ray.io/market-type` a KubeRay pod gets. The
node types declare these labels, so a pending request that selects any of them scales the right group. Every
node's GPUs are logical: this machine's real ones (`real_gpus`) go to no node of an autoscaling cluster.

Stopping freezes the monitor and each process under it (the nodes, launched or half launched, and their workers)
before listing its children, kills them all, then shuts the head down. Never `ray stop`, which
`AutoscalingCluster.shutdown` runs: it kills every Ray instance on the machine.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ray._raylet import RAY_NODE_GROUP_KEY, RAY_NODE_MARKET_TYPE_KEY
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.tags import TAG_RAY_USER_NODE_TYPE

from moedisco.config.resources import CPU_DEVICE_TYPE, NodeGroupConfig, ResourcesConfig
from ray_cluster import simulated as local
from ray_cluster.simulated import SIMULATED_LABEL, LocalClusterSpec

HEAD_NODE_TYPE = "ray.head.default"
UPDATE_INTERVAL_S = 1  # the autoscaler's loop; Ray's default of 5 s would add up to 5 s to every scale-up
KILL_WAIT_S = 10.0


class LocalNodeProvider(FakeMultiNodeProvider):
    """Ray's fake multi-node provider (each node a raylet of this machine, started by the autoscaler), with random
    node ids, so that two such clusters on one machine never share one, and each node group's market type."""

    def _next_hex_node_id(self) -> str:
        from ray import NodeID

        return NodeID.from_random().hex()

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        # Ray derives `ray.io/node-group` and `ray.io/market-type` from RAY_NODE_TYPE_NAME and RAY_NODE_MARKET_TYPE
        # in the process that starts the node (here the monitor, which serves every group), not in the raylet's
        # environment where the fake provider puts RAY_NODE_TYPE_NAME: so they are given as the node's labels.
        labels = {**labels, RAY_NODE_GROUP_KEY: tags[TAG_RAY_USER_NODE_TYPE],
                  RAY_NODE_MARKET_TYPE_KEY: node_config["market_type"]}
        super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)


# --- the autoscaling config -------------------------------------------------------------------------------------


def node_type(name: str, group: NodeGroupConfig, spec: LocalClusterSpec) -> dict:
    """The autoscaler's node type of one node group: its resources, labels and bounds."""
    gpus = 0 if group.device_type == CPU_DEVICE_TYPE else group.num_devices
    return {
        "resources": {"CPU": _whole(spec.cpus_per_node, "cpus_per_node"), "GPU": gpus,
                      "object_store_memory": spec.object_store_mb * 2**20,
                      **spec.custom_resources({spec.label_key: group.tier})},  # a CPU group's driver slots
        "labels": {spec.label_key: group.tier, SIMULATED_LABEL[0]: SIMULATED_LABEL[1], RAY_NODE_GROUP_KEY: name,
                   RAY_NODE_MARKET_TYPE_KEY: group.market},
        "node_config": {"market_type": group.market},
        "min_workers": group.min_nodes,
        "max_workers": spec.max_nodes.get(name, group.max_nodes),
        "priority": group.priority,  # as KubeRay passes a group's `priority`: the spot group is added first
        **({"idle_timeout_s": group.idle_timeout_s} if group.idle_timeout_s is not None else {}),
    }


def _whole(cpus: float, field_name: str) -> int:
    # The autoscaler's config schema takes whole resource amounts only.
    if cpus != int(cpus):
        raise ValueError(f"{field_name} is {cpus}: an autoscaling cluster's nodes take a whole number of CPUs")
    return int(cpus)


def autoscaling_config(spec: LocalClusterSpec, head_node_id: str, gcs_address: str) -> dict:
    """The autoscaler's cluster config: the head and one node type per node group of `ResourcesConfig()`."""
    resources = ResourcesConfig()
    unknown = sorted(set(spec.max_nodes) - set(resources.node_groups))
    if unknown:
        raise ValueError(f"max_nodes names node groups that do not exist: {', '.join(unknown)} "
                         f"(node groups: {', '.join(resources.node_groups)})")
    types = {name: node_type(name, group, spec) for name, group in resources.node_groups.items()}
    types[HEAD_NODE_TYPE] = {"resources": {"CPU": _whole(spec.head_cpus, "head_cpus")}, "node_config": {},
                             "max_workers": 0}
    idle_timeout_s = resources.idle_timeout_s if spec.idle_timeout_s is None else spec.idle_timeout_s
    return {
        "cluster_name": "moedisco-local",
        "max_workers": sum(t["max_workers"] for t in types.values()),
        "idle_timeout_minutes": idle_timeout_s / 60,
        "upscaling_speed": 1.0,  # a group launches max(1, this x its running nodes) at once; unset is 0
        "provider": {"type": "external", "module": f"{__name__}.{LocalNodeProvider.__name__}",
                     "gcs_address": gcs_address, "head_node_id": head_node_id, "launch_multiple": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": types,
        "head_node_type": HEAD_NODE_TYPE,
        # Sections of a cluster launcher's config that Ray's config preparation reads; nothing runs them here.
        "cluster_synced_files": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
    }


def publish_node_groups(gcs_address: str, config: dict) -> None:
    """The node groups' resources and bounds where Ray keeps a cluster's autoscaling config (the GCS's autoscaler
    namespace, read by `ray._private.state.state.get_cluster_config`, which Ray Data and
    `ray_cluster.placement.cluster_group_sizes` use), as a KubeRay cluster's autoscaler config gives them: the
    monitor of an `external` provider does not write it."""
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE, GcsClient
    from ray.core.generated import autoscaler_pb2

    cluster = autoscaler_pb2.ClusterConfig()
    for name, node_type in config["available_node_types"].items():
        if name == HEAD_NODE_TYPE:
            continue
        resources = {key: int(value) for key, value in node_type["resources"].items() if value}
        cluster.node_group_configs.add(name=name, resources=resources, min_count=node_type.get("min_workers", 0),
                                       max_count=node_type["max_workers"])
    GcsClient(address=gcs_address).internal_kv_put(GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(),
                                                   cluster.SerializeToString(), True,
                                                   GCS_AUTOSCALER_STATE_NAMESPACE.encode())


# --- the cluster ------------------------------------------------------------------------------------------------


class AutoscalingLocalCluster:
    """The head (a `ray.cluster_utils.Cluster` of one node, running the autoscaler) and the nodes it adds."""

    def __init__(self, spec: LocalClusterSpec):
        import ray.util
        from ray import NodeID
        from ray.cluster_utils import Cluster

        local.quiet_ray_env()
        local.set_up_auth()
        gcs_port = local.free_port()
        gcs_address = f"{ray.util.get_node_ip_address()}:{gcs_port}"
        head_node_id = NodeID.from_random().hex()
        # The monitor re-reads the config on every loop: it stays until shutdown.
        self._config_dir = Path(tempfile.mkdtemp(prefix="moedisco-autoscaler-"))
        config_path = self._config_dir / "autoscaling.json"  # JSON is YAML, which the monitor reads
        config_path.write_text(json.dumps(autoscaling_config(spec, head_node_id, gcs_address), indent=2))
        head = {**local.head_node_args(spec, gcs_port), "num_gpus": 0, "autoscaling_config": str(config_path)}
        # The head's processes, the monitor among them, inherit these. The autoscaler v2 finds the head among the
        # provider's nodes by the cloud instance id its raylet reports, and the fake provider needs RAY_FAKE_CLUSTER.
        with local.environment(RAY_ADDRESS=gcs_address, RAY_FAKE_CLUSTER="1", RAY_enable_autoscaler_v2="1",
                                RAY_CLOUD_INSTANCE_ID=head_node_id, RAY_OVERRIDE_NODE_ID_FOR_TESTING=head_node_id,
                                AUTOSCALER_UPDATE_INTERVAL_S=str(UPDATE_INTERVAL_S)):
            try:
                self._head = Cluster(initialize_head=True, head_node_args=head)
            except BaseException:
                shutil.rmtree(self._config_dir, ignore_errors=True)
                raise
        try:
            publish_node_groups(gcs_address, autoscaling_config(spec, head_node_id, gcs_address))
        except BaseException:
            self.shutdown()
            raise

    @property
    def address(self) -> str:
        return self._head.address

    @property
    def webui_url(self) -> str:
        return self._head.webui_url

    def processes(self) -> list:
        """Every process of the cluster alive now (psutil.Process): the head's and, under the monitor, the nodes'."""
        started = _processes(info.process.pid for infos in self._head.head_node.all_processes.values()
                             for info in infos)
        return [process for parent in started for process in (parent, *_children(parent))]

    def shutdown(self) -> None:
        """Stop the autoscaler, every node it started (launched or launching), then the head; returns when every
        process of the cluster is gone."""
        from ray._private import ray_constants

        monitors = _processes(info.process.pid for info in
                              self._head.head_node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []))
        everything = self.processes()
        try:
            # The monitor first, frozen before its children are listed: no launch starts or ends unseen. The nodes
            # go at once: a graceful stop of a raylet with busy workers takes seconds, for a GCS about to go.
            _kill(monitors + self._orphans(everything))
            self._head.shutdown()
        finally:
            _kill(everything)  # what outlived the head's own shutdown (the dashboard's module processes do)
            shutil.rmtree(self._config_dir, ignore_errors=True)

    def _orphans(self, known: list) -> list:
        """Processes naming the cluster's session folder (a node's raylet and agents do) that are not under the head
        any more: those of a node whose monitor died."""
        import psutil

        session, known_pids = self._head.head_node.get_session_dir_path(), {process.pid for process in known}
        return [process for process in psutil.process_iter(["cmdline"])
                if process.pid not in known_pids and _names(process.info["cmdline"] or (), session)]


def _names(cmdline, folder: str) -> bool:
    # session_..._123 is a prefix of another cluster's session_..._1234: only the folder itself or a path inside
    return any(arg == folder or arg.endswith("=" + folder) or folder + "/" in arg for arg in cmdline)


def _processes(pids) -> list:
    """psutil.Process of each pid still running."""
    import psutil

    alive = []
    for pid in pids:
        try:
            alive.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    return alive


def _children(process) -> list:
    import psutil

    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _signal(process, action: str) -> None:
    import psutil

    try:
        getattr(process, action)()  # psutil checks it is still the process it was, not a reused pid
    except psutil.NoSuchProcess:
        pass


def _running(processes: list) -> list:
    import psutil

    def running(process) -> bool:
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return [process for process in processes if running(process)]


def _kill(processes: list) -> None:
    """SIGKILL the processes and all their descendants, each frozen before its children are listed, so that none
    starts one unseen; returns when they are gone (or after KILL_WAIT_S)."""
    import psutil

    frozen, pending, seen = [], list(processes), set()
    while pending:
        process = pending.pop()
        if process.pid in seen:
            continue
        seen.add(process.pid)
        try:
            process.suspend()
            pending += process.children()
            frozen.append(process)
        except psutil.NoSuchProcess:
            continue
    for process in frozen:
        _signal(process, "kill")
    psutil.wait_procs(_running(frozen), timeout=KILL_WAIT_S)


# --- inspection -------------------------------------------------------------------------------------------------


def launch_requests(gcs_address: str) -> list[dict]:
    """The autoscaler's launch requests not yet fulfilled (PENDING) or given up (FAILED), oldest first: node type,
    count, state, when requested (`request_ts_s`, unix seconds) and, for a failed one, when and why."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(gcs_address)
    return sorted(({"node_type": request.ray_node_type_name, "count": request.count, "state": request.state.value,
                    "request_ts_s": request.request_ts_s, "failed_ts_s": request.failed_ts_s,
                    "details": request.details}
                   for request in (*status.pending_launches, *status.failed_launches)),
                  key=lambda request: request["request_ts_s"])


def pending_nodes(gcs_address: str) -> list[dict]:
    """Nodes the autoscaler has launched whose Ray has not joined yet: node type, instance id, what it waits for."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    return [{"node_type": node.ray_node_type_name, "instance_id": node.instance_id, "details": node.details}
            for node in get_cluster_status(gcs_address).pending_nodes]
