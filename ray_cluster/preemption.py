"""What Ray Train is told about preemptions: how fast its watcher polls for drained nodes, and how many preempted
restarts a trainer gets.

    options["runtime_env"] = {"env_vars": watch_env(spec, ray.nodes())}   # the launcher; None: Ray's defaults
    RunConfig(..., failure_config=failure_config(spec.resources))

A trainer hears of a drain (a spot notice, a node upgrade: k8s/'s preStop `ray drain-node`) only through Ray Train's
preemption watcher, which polls the GCS every 5 s by default: a third of the 15 s GKE leaves a spot node's pods. So
a job whose training tiers may land on spot capacity polls every second, found without a flag: a tier that says
`spot`, a spot node group of the tier's label with nodes to give (`resources.node_groups`), or an alive node of the
tier's label that is spot by its labels (our manifests' `market: spot`, Ray's `ray.io/market-type` from KubeRay).
The trainers' controllers inherit the launcher's environment (`ray_cluster.prestart`).

A drained node's workers that did not return in time die as preempted ones, which Ray Train charges to
`max_preemption_failures`, never to `max_failures`; the driver counts the preempted trainers it restarts against
the same `resources.max_preemptions`. `preemption_grace_s` is left at 0: it lets surviving workers outlive the
drain's deadline, but a moedisco checkpoint needs every rank (FSDP2 writes it together), and a survivor of a
one-worker trainer does not exist.
"""

from __future__ import annotations

import os

from ray.train import FailureConfig

from moedisco.config.resources import ResourcesConfig, TierConfig
from moedisco.config.spec import JobSpec
from moedisco.job.registry import STAGE, tier_of
from ray_cluster.local_cluster import SIMULATED_LABEL

SPOT_LABELS = ("market", "ray.io/market-type")  # ours (k8s/ rayStartParams labels), KubeRay's
FAST_POLL_S = "1"


def training_tiers(spec: JobSpec) -> list[TierConfig]:
    return [tier_of(spec.resources, name) for name, stage in STAGE.items() if stage.trained]


def is_spot_node(node: dict) -> bool:
    """A node of `ray.nodes()` whose labels say it is spot capacity."""
    labels = node.get("Labels") or {}
    return any(labels.get(key) == "spot" for key in SPOT_LABELS)


def may_land_on_spot(resources: ResourcesConfig, tier: TierConfig, nodes: list[dict]) -> bool:
    """Whether `tier`'s workers may run on spot nodes. A simulated tier's nodes are this machine's processes, never
    the cloud's: only its own nodes' labels or flag say so."""
    tier_nodes = [node for node in nodes if node.get("Alive", True)
                  and (node.get("Labels") or {}).get(resources.label_key) == tier.label]
    if tier.spot or any(is_spot_node(node) for node in tier_nodes):
        return True
    key, value = SIMULATED_LABEL
    if tier.simulated or any((node.get("Labels") or {}).get(key) == value for node in tier_nodes):
        return False
    return any(group.market == "spot" and group.tier == tier.label and group.max_nodes > 0
               for group in resources.node_groups.values())


def watch_env(spec: JobSpec, nodes: list[dict]) -> dict[str, str] | None:
    """The launcher's environment for a job whose trainers may be preempted on spot: the watcher on, every second
    (unless RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S says otherwise); None: Ray's defaults."""
    if not any(may_land_on_spot(spec.resources, tier, nodes) for tier in training_tiers(spec)):
        return None
    return {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1",
            "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": os.environ.get("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", FAST_POLL_S)}


def failure_config(resources: ResourcesConfig) -> FailureConfig:
    limit = resources.max_preemptions
    return FailureConfig(max_failures=resources.max_failures,
                         max_preemption_failures=-1 if limit is None else limit)
