"""What a job's work says of the nodes it holds, the billed cost's input (`moedisco.planning.billing`): a worker's
use of its node for a task, a driver's slot on a CPU node, and a node kept between synchronisation rounds.

    with NodeUseReporter(queue, task.ids).held(): ...    # this worker holds its node for the task (`NodeUse`)
    use = driver_use()                                   # this job actor's driver slot, or None
    holds = RoundHolds(events); holds.hold(task, nodes)  # keep a finished round's nodes for the next round

Light to import (no torch), as `ray_cluster.placement`: every Ray worker that runs a stage imports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import ray

from moedisco.job.events import NodeUse
from moedisco.job.registry import Task
from ray_cluster.local_cluster import DRIVER_RESOURCE

log = logging.getLogger(__name__)

_BUNDLE_SUFFIX = re.compile(r"_group_(\d+_)?[0-9a-f]+$")
PUSH_TIMEOUT_S = 30.0


def assigned_resources() -> dict[str, float]:
    """What Ray assigned this worker on its node, by plain resource name (CPU, GPU): a bundle's resource counts as
    the plain one, once."""
    plain: dict[str, float] = {}
    for name, amount in ray.get_runtime_context().get_assigned_resources().items():
        base = _BUNDLE_SUFFIX.sub("", name)
        plain[base] = max(plain.get(base, 0.0), amount)
    return plain


@dataclass(frozen=True)
class NodeUseReporter:
    """Says on the job's event queue (`ray_cluster.tracking.EventQueue`) that this worker holds its node's resources
    for the task `ids` names (`Task.ids`): an open `NodeUse` as it starts, the closed one as it ends. Without a
    queue (a stage called outside a job) it says nothing. Both pushes are waited for: the open one reaches the
    driver before anything the worker says next, the closed one before the task's result."""

    events: Any = None  # the job's EventQueue handle
    ids: dict = field(default_factory=dict)  # stage, expert, round

    def open(self, start: float | None = None) -> NodeUse | None:
        if self.events is None:
            return None
        context = ray.get_runtime_context()
        use = NodeUse(**self.ids, node=context.get_node_id(), pid=os.getpid(),
                      start=time.time() if start is None else start, resources=assigned_resources())
        self.push(use)
        return use

    def close(self, use: NodeUse | None) -> None:
        if use is not None:
            self.push(use.model_copy(update={"end": time.time()}))

    def push(self, use: NodeUse) -> None:
        try:
            ray.get(self.events.push.remote(use), timeout=PUSH_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError) as error:  # the driver is gone: the work goes on
            log.warning("could not report node use %s: %s", use.use_id, error)

    @contextlib.contextmanager
    def held(self, start: float | None = None) -> Iterator[None]:
        """The node is held from `start` (default: now) to the end of the block, raised or returned."""
        use = self.open(start)
        try:
            yield
        finally:
            self.close(use)


SILENT = NodeUseReporter()  # reports nothing: a stage called outside a job (frozen, so one for all)


def driver_use(stage: str = "driver") -> NodeUse | None:
    """The use of its node this process holds as a job's driver, when it holds a `DRIVER_RESOURCE` slot (the
    service's job actor): the CPU node it keeps up is billed to the job too. None for a driver started by hand."""
    try:
        held = ray.get_runtime_context().get_assigned_resources().get(DRIVER_RESOURCE, 0.0)
    except Exception:  # noqa: BLE001 - not a Ray worker (a driver script): it holds no slot
        return None
    if not held:
        return None
    return NodeUse(stage=stage, node=ray.get_runtime_context().get_node_id(), pid=os.getpid(), start=time.time(),
                   resources={DRIVER_RESOURCE: held})


HOLD_PLACE_TIMEOUT_S = 10.0  # a hold asks for next to nothing: it is placed at once unless its node is gone
# A hold reserves one byte of the node's memory: enough for Ray to count the node as in use, so that the autoscaler
# keeps it, and nothing a task or trainer asks for, so the next round's trainers (or another job's) still fit.
HOLD_BUNDLE = {"memory": 1}


class RoundHolds:
    """The nodes a synchronisation round's trainers ran on, kept from their trainer's end until the next round's
    work starts on them (its trainers, the merge; the sync keeps the hold) or the cheap phase ends: an idle node goes once its
    idle timeout passes, and at real scale a sync and the trainers' start would otherwise let every expert's pod go
    and cost the next round E cold starts (a VM and a multi-GB image each). Each hold is a placement group of
    `HOLD_BUNDLE` on that node, and the job's node use for that time (stage `sync`, no resources: the whole node, as
    it is kept for the job alone), so the billed cost charges the job for keeping it.

        holds = RoundHolds(events)
        holds.hold(task, nodes=["<node id>"])   # a submodel trainer of a round before the last ended
        holds.release("<node id>")              # the next round's work opened a use of that node
        holds.release()                         # the cheap phase is over, or the job ends
    """

    def __init__(self, events):
        self.events = events
        self.held: dict[str, tuple[Any, NodeUse]] = {}  # by node

    def hold(self, task: Task, nodes: list[str]) -> None:
        """Hold each of `nodes`; a node that cannot be held (gone, the cluster unreachable) is left to the
        autoscaler: a lost hold costs a cold start, never the job."""
        for node in nodes:
            if node not in self.held:
                try:
                    self._hold(task, node)
                except Exception as error:  # noqa: BLE001 - any failure: the hold is an optimisation
                    log.warning("could not hold node %s for the next round: %s", node, error)

    def _hold(self, task: Task, node: str) -> None:
        from ray.util.placement_group import placement_group, remove_placement_group

        group = placement_group([HOLD_BUNDLE], strategy="STRICT_PACK", _soft_target_node_id=node)
        ready, _ = ray.wait([group.ready()], timeout=HOLD_PLACE_TIMEOUT_S)
        if not ready or _bundle_node(group) != node:  # the node went (a preemption): nothing to keep
            remove_placement_group(group)
            return
        use = NodeUse(stage="sync", round=task.round, node=node, pid=os.getpid(), start=time.time())
        self.events(use)
        self.held[node] = (group, use)

    def release(self, node: str | None = None) -> None:
        """Give back the hold of `node`, or of every node."""
        from ray.util.placement_group import remove_placement_group

        for held in [node] if node is not None else list(self.held):
            if held not in self.held:
                continue
            group, use = self.held.pop(held)
            with contextlib.suppress(Exception):  # the cluster is going away: the hold goes with it
                remove_placement_group(group)
            self.events(use.model_copy(update={"end": time.time()}))


def _bundle_node(group) -> str | None:
    from ray.util import placement_group_table

    return (placement_group_table(group).get("bundles_to_node_id") or {}).get(0)
