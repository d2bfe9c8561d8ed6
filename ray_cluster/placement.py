"""Where a task runs on Ray: its tier (label selector, declared resources), the control plane, and where its files go.

    placement_tier(spec, "embed")                        # the tier it runs on: spec.resources.submodel_tier
    task_options(spec, tier)                             # {"num_cpus": 1, "num_gpus": 1, "label_selector": {...}}
    check_tiers_reachable(spec)                          # raises TierUnreachable naming a label nothing offers
    on_driver_group()                                    # options that put a job's driver on a CPU node
    run_name(spec, task)                                 # Ray Train's run: "<job_key>/<task.marker>"

A tier's resource need is declared (`TierConfig.gpus_per_worker_needed`), never read from the nodes alive at job
start: on a cluster whose GPU groups start at zero pods nothing of the tier is alive yet, and the request itself
is what makes the autoscaler add a pod of the right kind. What a job's work says of the nodes it holds, for the
billed cost, is `ray_cluster.node_uses`'. Light to import on purpose (no torch), since every Ray worker that unpickles a stage's
function imports it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import ray

from moedisco.config.resources import TierConfig
from moedisco.config.spec import JobSpec
from moedisco.io.storage import is_uri, join
from moedisco.job import registry
from moedisco.job.layout import JobPaths
from moedisco.job.registry import Task
from ray_cluster.local_cluster import (
    CONTROL_PLANE_LABEL,
    DRIVER_RESOURCE,
    SIMULATED_LABEL,
    describe_nodes,
    nodes_with_label,
)
from ray_cluster.node_uses import SILENT, NodeUseReporter

if TYPE_CHECKING:
    from moedisco.stages.stage_run import StageRun

log = logging.getLogger(__name__)


def storage_root(spec: JobSpec) -> Path | str:
    """`resources.storage_path`, else the job folder (for an `output_dir` on object storage, its local staging
    folder, `moedisco.job.layout.JobPaths`); an object-storage `storage_path` is its URI, which Ray Train and Ray Data
    read and write themselves."""
    if is_uri(spec.resources.storage_path):
        return spec.resources.storage_path
    return Path(spec.resources.storage_path or JobPaths(spec.output_dir).root).resolve()


def check_output_dir(spec: JobSpec, node_addresses: list[str], driver_address: str) -> None:
    """An `output_dir` on object storage is worked on in a local staging folder (`moedisco.io.storage`), which each
    Ray worker finds on its own machine: on a cluster of several machines the job's files would be split between
    their disks. So it needs every node on the driver's machine (a local simulated cluster); a real cluster writes
    its job folder to storage every node shares."""
    if not is_uri(spec.output_dir):
        return
    others = sorted({address for address in node_addresses if address != driver_address})
    if others:
        raise ValueError(f"output_dir {spec.output_dir}: an object-storage output_dir needs every Ray node on the "
                         f"driver's machine ({driver_address}), but nodes run on {', '.join(others)}: each would "
                         "stage the job folder on its own disk. Use an output_dir on storage every node mounts "
                         "(NFS, a shared volume); resources.storage_path may be an s3:// or gs:// URI, where Ray "
                         "Train keeps the checkpoints")


def job_key(spec: JobSpec) -> str:
    """The job's folder name on shared storage: its name (for people) and a digest of its output_dir (one per
    job), so two jobs of the same name on one storage path never share, restore or delete each other's files."""
    output_dir = spec.output_dir if is_uri(spec.output_dir) else Path(spec.output_dir).resolve()
    digest = hashlib.sha256(str(output_dir).encode()).hexdigest()[:12]
    return f"{spec.name}-{digest}"


def job_storage(spec: JobSpec) -> Path | str:
    """Ray's own files of this job (corpus shards, the fit sample's embeddings, the assignment pass's rows, Ray
    Train runs)."""
    return join(storage_root(spec), job_key(spec))


def run_name(spec: JobSpec, task: Task) -> str:
    """Ray Train's run name of a training task, under the job's storage folder: its marker, so that every
    synchronisation round but the last is a run of its own and a restarted worker restores the round's own
    checkpoints, not an earlier round's copy from before its sync."""
    return f"{job_key(spec)}/{task.marker}"


def placement_tier(spec: JobSpec, stage: str) -> TierConfig:
    """The tier a stage's tasks are placed on: the one that pays for it (`moedisco.job.registry.tier_of`)."""
    return registry.tier_of(spec.resources, stage)


def label_selector(spec: JobSpec, tier: TierConfig) -> dict[str, str]:
    return {spec.resources.label_key: tier.label}


def tier_nodes(spec: JobSpec, tier: TierConfig) -> list[dict]:
    return nodes_with_label(spec.resources.label_key, tier.label)


def tier_capacity(spec: JobSpec, tier: TierConfig) -> int:
    """The most nodes of `tier` the job may get: its nodes alive now, or with an autoscaler the most its node groups
    may grow to, when that is more: the cluster's own bounds where its autoscaler config is in the GCS, else the
    spec's `resources.node_groups` (KubeRay's `maxReplicas`, which a test keeps equal to k8s/). Never more than
    `resources.max_parallel`, the most pods a job asks for at once. A data stage's actor pool asks for this many."""
    alive = len(tier_nodes(spec, tier))
    if autoscaler_present(spec):
        most = cluster_group_sizes()
        groups = sum(most.get(name, group.max_nodes) for name, group in spec.resources.node_groups.items()
                     if group.tier == tier.label)
        alive = max(alive, groups)
    return min(alive, spec.resources.max_parallel or alive)


def cluster_group_sizes() -> dict[str, int]:
    """The most nodes of each node group the connected cluster's autoscaler may run (its config, as autoscaler v2
    stores it in the GCS: KubeRay's `maxReplicas`, the local cluster's `max_nodes`); empty when there is none. A
    group asked for more than this would leave work pending that no node will ever take."""
    return {group.name: group.max_count for group in cluster_node_groups() if group.max_count >= 0}


def worker_resources(tier: TierConfig) -> dict[str, float]:
    """What one worker of `tier` asks Ray for: a CPU (one simulated node holds one worker) and its GPUs. Every
    placement reads it: trainers' workers, the embedding actors, the data worker, the sync and merge tasks."""
    gpus = tier.gpus_per_worker_needed()
    return {"CPU": 1, "GPU": gpus} if gpus else {"CPU": 1}


def task_options(spec: JobSpec, tier: TierConfig) -> dict:
    """Ray task or actor options for one worker of `tier`: its resources and the tier's label selector."""
    resources = worker_resources(tier)
    return {"num_cpus": resources["CPU"], "num_gpus": resources.get("GPU", 0),
            "label_selector": label_selector(spec, tier)}


def tier_simulated(spec: JobSpec, tier: TierConfig) -> bool:
    """Whether `tier`'s GPUs are logical, as the driver sees it: declared so, or the tier's nodes are the local
    simulated cluster's (which exist from its start: no autoscaler adds them)."""
    key, value = SIMULATED_LABEL
    return tier.simulated or any(node["labels"].get(key) == value for node in tier_nodes(spec, tier))


def on_simulated_device(tier: TierConfig) -> bool:
    """True in a worker whose GPU is logical: its tier is declared simulated, or its node is one of the local
    simulated cluster's (`ray_cluster.local_cluster.SIMULATED_LABEL`), whatever the job declared."""
    key, value = SIMULATED_LABEL
    return tier.simulated or ray.get_runtime_context().get_node_labels().get(key) == value


def prepare_worker(tier: TierConfig) -> None:
    """Call first thing in a Ray worker of `tier`, before torch touches CUDA.

    On a simulated device Ray still sets CUDA_VISIBLE_DEVICES to the logical GPU's index, which on a machine with
    one real GPU is that GPU: hidden, `device: auto` picks the CPU, so simulated workers never share the real card
    (torch reads the variable when CUDA first initialises). And Ray sets OMP_NUM_THREADS to a task's CPUs (1),
    which leaves torch one thread on a pod of six: CPU work gets the threads the node offers."""
    if on_simulated_device(tier):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    torch.set_num_threads(node_cpus())


def node_cpus() -> int:
    """Logical CPUs of the node this worker runs on (a pod's CPU limit on KubeRay), at least 1."""
    node_id = ray.get_runtime_context().get_node_id()
    cpus = next((node["Resources"].get("CPU", 1) for node in ray.nodes() if node["NodeID"] == node_id), 1)
    return max(1, int(cpus))


def run_stage_on_tier(run: StageRun, tier: TierConfig, reporter: NodeUseReporter | None = None) -> dict:
    """`moedisco.runner.execute.run_stage` as a Ray task on `tier` (sync, merge, source)."""
    with (reporter or SILENT).held():
        prepare_worker(tier)
        from moedisco.runner.execute import run_stage  # torch: in the worker, after `prepare_worker`

        return run_stage(run)


# A placement group's bundle resources (`GPU_group_0_<group id>`, `GPU_group_<group id>`), as older Rays name them.
class TierUnreachable(RuntimeError):
    """A tier's label is on no alive node and no autoscaler will add one: the job would wait forever."""


def autoscaler_present(spec: JobSpec) -> bool:
    """`resources.autoscaling` when set, else whether an autoscaler has reported its state to this cluster's
    GCS (KubeRay's in-tree autoscaler v2 does every few seconds; a plain `ray start` cluster has none)."""
    if spec.resources.autoscaling is not None:
        return spec.resources.autoscaling
    return cluster_autoscales()


def cluster_autoscales() -> bool:
    """Whether an autoscaler has reported its state to the connected cluster's GCS."""
    from ray._raylet import GcsClient
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    reply = GetClusterStatusReply()
    reply.ParseFromString(GcsClient(ray.get_runtime_context().gcs_address).get_cluster_status(timeout_s=10))
    return reply.HasField("autoscaling_state") and bool(reply.autoscaling_state.autoscaler_state_version)


def check_tiers_reachable(spec: JobSpec) -> None:
    """Raise `TierUnreachable` naming the first label of the job's tiers that no alive node carries, unless an
    autoscaler may still add such a node (then the job's pending requests are what asks it to)."""
    labels = dict.fromkeys(placement_tier(spec, task.stage).label for group in registry.plan(spec) for task in group)
    offered = {node["labels"].get(spec.resources.label_key) for node in describe_nodes()}
    missing = [label for label in labels if label not in offered]
    if missing and not autoscaler_present(spec):
        raise TierUnreachable(
            f"no alive node carries the label {spec.resources.label_key}={missing[0]} and this cluster has no "
            "autoscaler to add one; start such a node, or set resources.autoscaling=true if nodes are added "
            "another way")


def control_plane_selector() -> dict[str, str] | None:
    """The head's label selector (`CONTROL_PLANE_LABEL`, as k8s/ and the local cluster label it); None, with a
    warning, on a cluster whose nodes do not carry it (a plain `ray start`), where pinning would wait forever."""
    [(key, value)] = CONTROL_PLANE_LABEL.items()
    if not ray.is_initialized():  # an application builder run before Ray is up: the manifest's args decide
        return None
    if any(node["labels"].get(key) == value for node in describe_nodes()):
        return dict(CONTROL_PLANE_LABEL)
    log.warning("no node carries %s=%s: the control plane may land on any node", key, value)
    return None


def on_driver_group() -> dict:
    """Options that put a job's driver (the service's job actor, zero CPUs) on a node of the on-demand CPU group, in
    one of its `DRIVER_RESOURCE` slots: not on the head, whose restart would end every running job (the trainers'
    launcher, event queue, Ray Data coordinators and trainers' controllers follow the driver, `on_driver_node`),
    and not on a spot GPU pod that may go away. The slot, not a label alone, is what a pending driver asks the
    autoscaler for and what keeps its node from going idle. A cluster whose nodes and autoscaler offer no slot (a
    plain `ray start`) keeps the driver where it did before: on the head when a node carries the head's label."""
    if driver_slots_offered():
        return {"num_cpus": 0, "resources": {DRIVER_RESOURCE: 1}}
    selector = control_plane_selector()
    log.warning("no node or node group offers %s: the job's driver runs %s", DRIVER_RESOURCE,
                "on the head" if selector else "on any node")
    return {"num_cpus": 0, **({"label_selector": selector} if selector else {})}


def driver_slots_offered() -> bool:
    """Whether an alive node offers `DRIVER_RESOURCE`, or a node group the autoscaler may add does."""
    if not ray.is_initialized():
        return False
    if any(node["resources"].get(DRIVER_RESOURCE) for node in describe_nodes()):
        return True
    return any(group.resources.get(DRIVER_RESOURCE) and group.max_count != 0 for group in cluster_node_groups())


def cluster_node_groups() -> list:
    """The autoscaler's node groups as it stored them in the GCS (`autoscaler_pb2.NodeGroupConfig`), empty when
    there is none or it cannot be read."""
    from ray._private.state import state  # the GCS accessor Ray Data reads the same config with

    try:
        config = state.get_cluster_config()
    except Exception as error:  # noqa: BLE001 - an older GCS, a lost connection: no node groups known
        log.warning("could not read the autoscaler's node groups: %s", error)
        return []
    return list(config.node_group_configs) if config is not None else []


def on_driver_node() -> dict:
    """Options that keep a zero-CPU coordinating task or actor on the driver's node, as Ray Train does with its
    controller: it is no work for the tiers, and it goes away with the driver."""
    return {"num_cpus": 0, "label_selector": {"ray.io/node-id": ray.get_runtime_context().get_node_id()}}
