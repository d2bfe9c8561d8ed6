"""A deadline on capacity: work whose tier never gets the nodes it asks for fails the job instead of waiting forever.

    clock = CapacityClock(timeout_s=spec.resources.capacity_timeout_s)
    clock.submitted(("finetune", None), Demand.of(spec, "finetune_tier", autoscaled=True), now=time.monotonic())
    clock.arrived(("finetune", None), now)     # the first of its workers holds a node (`NodeUse`, rank 0 started)
    clock.finished(("finetune", None), now)    # its result came
    if (starved := clock.starved(now, cluster=lambda demand: tier_state(gcs_address, demand))) is not None:
        raise CapacityTimeout(starved, autoscaler_note(starved.demand, gcs_address))

A GPU quota, a spot stock-out, a node group whose label has a typo or whose maxReplicas is 0: the cluster never
places the work, and Ray waits without limit (Ray Train re-creates a trainer's pending placement group every
minute), so the job would hold one of the service's running slots forever. Waiting is normal on a full cluster,
though: experts queue behind others for a tier's few nodes. So a tier's clock stands still while some of the job's
work holds a node of it, and starts again whenever work of the tier starts or finishes; work that has waited
`timeout_s` by that clock is starved once the cluster agrees for `confirm_s` on end (`tier_state`, asked only past
the timeout): it holds requests for the label unmet, and no node of the label is in use. A worker says it holds its
node only once it runs, which for a trainer is after Ray Train has started its worker group; until then its
placement shows in the cluster (nothing left pending, or the node in use), and the confirmation outlasts the moment
between a placement group's creation and its placement. A node in use by another job counts too: the work queues
behind it. Tiers are told apart by their label (`label_key=label`): nodes of one label are one pool. The clock is
plain Python; `ray_cluster.tracking.Tracker` feeds it from its workers' events and its results, with the driver's
monotonic clock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from moedisco.config.spec import JobSpec
from ray_cluster.placement import worker_resources

log = logging.getLogger(__name__)
Key = tuple[str, int | None]  # (stage, expert): `moedisco.job.registry.Task.key`
CONFIRM_S = 30.0  # at most: the cluster's view is a few moments old, and a placement takes a moment


@dataclass
class Demand:
    """What a piece of work waits for: one worker's resources on a node of a tier (its label).

        Demand.of(spec, "finetune_tier", autoscaled=True).selector   # "gpu_type=A100"
    """

    tier: str  # the `ResourcesConfig` field: "finetune_tier"
    label_key: str
    label: str
    resources: dict[str, float]  # one worker's (`placement.worker_resources`)
    autoscaled: bool = False  # an autoscaler may add nodes of the label
    node_groups: dict[str, int] = field(default_factory=dict)  # declared groups of the label: name -> max_nodes

    @classmethod
    def of(cls, spec: JobSpec, tier: str, autoscaled: bool) -> Demand:
        config = getattr(spec.resources, tier)
        groups = {name: group.max_nodes for name, group in spec.resources.node_groups.items()
                  if group.tier == config.label}
        return cls(tier, spec.resources.label_key, config.label, worker_resources(config), autoscaled, groups)

    @property
    def selector(self) -> str:
        return f"{self.label_key}={self.label}"


@dataclass
class Starved:
    """Work that waited `timeout_s` for its tier with no work of the tier starting, running or finishing."""

    key: Key
    demand: Demand
    waited_s: float  # since it was submitted
    idle_s: float  # since the tier last saw progress (or since it was submitted, if later)
    timeout_s: float
    num_pending: int = 0  # requests for its label the cluster holds unmet
    confirm_s: float = 0.0  # how long the cluster has shown them unmet, with no node of the label in use


@dataclass
class TierState:
    """What the cluster says of a label at one moment (`tier_state`), any job's work counted."""

    num_pending: int  # unmet requests that select the label: tasks, actors, placement groups' bundles
    num_busy: int  # alive nodes of the label with some of their resources in use, and nodes of it launching


@dataclass
class _Work:
    demand: Demand
    since: float
    arrived: bool = False


class CapacityClock:
    """Which work waits for nodes, and whether some has waited too long for a tier that makes no progress."""

    def __init__(self, timeout_s: float, confirm_s: float | None = None):
        self.timeout_s = timeout_s
        self.confirm_s = min(timeout_s, CONFIRM_S) if confirm_s is None else confirm_s
        self.work: dict[Key, _Work] = {}
        self.progress: dict[str, float] = {}  # by selector: when work of the tier last started or finished
        self.unmet_since: dict[str, float] = {}  # by selector: since when every look at the cluster found it starved

    def submitted(self, key: Key, demand: Demand, now: float) -> None:
        """The work asks for its nodes from `now` (again, for a trainer started anew after a preemption)."""
        self.work[key] = _Work(demand, now)

    def arrived(self, key: Key, now: float) -> None:
        """A worker of the work holds a node: the first one ends its wait; any one is progress for its tier."""
        work = self.work.get(key)
        if work is not None:
            work.arrived = True
            self.progressed(work.demand.selector, now)

    def finished(self, key: Key, now: float) -> None:
        """Its result came, or it failed: a node of its tier came free, if it held one."""
        work = self.work.pop(key, None)
        if work is not None:
            self.progressed(work.demand.selector, now)

    def progressed(self, selector: str, now: float) -> None:
        self.progress[selector] = now
        self.unmet_since.pop(selector, None)

    def waiting(self) -> bool:
        return any(not work.arrived for work in self.work.values())

    def running(self) -> list[Key]:
        """Work that holds (or held) a node and whose result has not come yet."""
        return [key for key, work in self.work.items() if work.arrived]

    def clear(self) -> None:
        """Nothing of the job runs any more (it was cancelled or failed)."""
        self.work.clear()
        self.progress.clear()
        self.unmet_since.clear()

    def starved(self, now: float, cluster: Callable[[Demand], TierState]) -> Starved | None:
        """The work that waited longest among those starved at `now`, else None. `cluster(demand)`: the state of
        the demand's label, asked once per label and only for work past its timeout; a label whose nodes are in
        use makes progress (its work queues behind), one with no request pending is placing or starting its work,
        and one found otherwise at every look for `confirm_s` starves its work."""
        busy = {work.demand.selector for work in self.work.values() if work.arrived}
        states: dict[str, TierState] = {}
        worst: Starved | None = None
        for key, work in self.work.items():
            selector = work.demand.selector
            if work.arrived or selector in busy:
                continue
            idle = now - max(work.since, self.progress.get(selector, work.since))
            if idle <= self.timeout_s or (worst is not None and now - work.since <= worst.waited_s):
                continue
            if selector not in states:
                states[selector] = state = cluster(work.demand)
                if state.num_busy:
                    self.progressed(selector, now)
                elif not state.num_pending:
                    self.unmet_since.pop(selector, None)
                else:
                    self.unmet_since.setdefault(selector, now)
            state, unmet_since = states[selector], self.unmet_since.get(selector)
            if unmet_since is not None and now - unmet_since >= self.confirm_s:
                worst = Starved(key, work.demand, now - work.since, idle, self.timeout_s, state.num_pending,
                                now - unmet_since)
        return worst


class CapacityTimeout(RuntimeError):
    """Work of the job waited `resources.capacity_timeout_s` for nodes its tier never got: the job fails, naming
    the stage, the tier's label and what one worker asked for, so that its service slot and its demand go."""

    def __init__(self, starved: Starved, note: str = ""):
        self.starved = starved
        super().__init__(describe(starved) + (f"; {note}" if note else ""))


def describe(starved: Starved) -> str:
    stage, expert = starved.key
    demand = starved.demand
    work = f"stage {stage}" + (f" (expert {expert})" if expert is not None else "")
    asked = ", ".join(f"{amount:g} {name}" for name, amount in demand.resources.items())
    return (f"{work} waited {starved.waited_s:.0f} s for a node of its tier {demand.tier} ({demand.selector}) "
            f"with {asked} free for one worker, and no work of the job on that tier started or finished for "
            f"{starved.idle_s:.0f} s (resources.capacity_timeout_s = {starved.timeout_s:g}); the cluster holds "
            f"{starved.num_pending} request(s) for that label unmet, and had no node of it in use for the last "
            f"{starved.confirm_s:.0f} s. It does not place them: no node group of that label, or one at its maximum "
            "of nodes, a GPU quota, a spot stock-out, or nodes too small for the request. Finished stages are kept: "
            "resume the job once such nodes can come")


def tier_state(gcs_address: str, demand: Demand) -> TierState:
    """The demand's label as the raylets report it to the GCS (one call, with or without an autoscaler)."""
    from ray._raylet import GcsClient
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply, NodeStatus

    reply = GetClusterStatusReply()
    reply.ParseFromString(GcsClient(gcs_address).get_cluster_status(timeout_s=10))
    state = reply.cluster_resource_state
    singles = sum(request.count for request in state.pending_resource_requests
                  if _selects(request.request.label_selectors, demand))
    bundles = sum(1 for gang in state.pending_gang_resource_requests for selector in gang.bundle_selectors
                  for request in selector.resource_requests if _selects(request.label_selectors, demand))
    busy = sum(1 for node in state.node_states if node.labels.get(demand.label_key) == demand.label
               and node.status != NodeStatus.DEAD and _in_use(node, demand))
    # A node of the label's groups that the autoscaler is launching is on its way (a GPU VM and a multi-GB image
    # can take many minutes): that is progress, not starvation.
    scaling = reply.autoscaling_state
    launching = sum(request.count for request in scaling.pending_instance_requests
                    if request.ray_node_type_name in demand.node_groups)
    launching += sum(1 for node in scaling.pending_instances if node.ray_node_type_name in demand.node_groups)
    return TierState(num_pending=singles + bundles, num_busy=busy + launching)


def _in_use(node, demand: Demand) -> bool:
    """The node runs something, or holds some resources of the kinds the demand asks for (its status can say IDLE
    a moment after they were taken); a resource used up is absent from `available_resources`."""
    from ray.core.generated.autoscaler_pb2 import NodeStatus

    return node.status == NodeStatus.RUNNING or any(
        node.available_resources.get(name, 0.0) < node.total_resources.get(name, 0.0) for name in demand.resources)


def _selects(selectors, demand: Demand) -> bool:
    from ray.core.generated.common_pb2 import LABEL_OPERATOR_IN

    return any(constraint.label_key == demand.label_key and constraint.operator == LABEL_OPERATOR_IN
               and demand.label in constraint.label_values
               for selector in selectors for constraint in selector.label_constraints)


def autoscaler_note(demand: Demand, gcs_address: str) -> str:
    """What the cluster says about the tier's nodes: its node groups and the autoscaler's launch requests for them
    (`ray_cluster.autoscaling.launch_requests`: pending, or failed with the cloud's reason)."""
    if not demand.autoscaled:
        return "this cluster has no autoscaler: only the nodes already there can take it"
    if not demand.node_groups:
        return f"resources.node_groups declares no node group of {demand.selector}"
    groups = "node groups of that label: " + ", ".join(f"{name} (at most {most})"
                                                         for name, most in demand.node_groups.items())
    try:
        from ray_cluster.autoscaling import launch_requests

        requests = [request for request in launch_requests(gcs_address) if request["node_type"] in demand.node_groups]
    except Exception as error:  # noqa: BLE001 - a note on the error; the timeout itself must still be raised
        log.warning("could not read the autoscaler's launch requests: %s", error)
        return groups
    if not requests:
        return f"{groups}; the autoscaler has no pending or failed launch of them"
    launches = "; ".join(f"{request['count']} x {request['node_type']} {request['state']}"
                         + (f" ({request['details']})" if request["details"] else "") for request in requests)
    return f"{groups}; the autoscaler's launches: {launches}"
