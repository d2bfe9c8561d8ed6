"""Waiting on a job's remote work: events from workers, expert states, node slots, work redone, cancellation.

    tracker = Tracker(emit=print, should_stop=lambda: False)
    tracker.enqueue(("submodel", 0), start=lambda: tracker.launcher.fit.remote(trainer), limit=4)
    summary = tracker.wait(("submodel", 0))   # starts it when a slot is free, forwards progress, honours should_stop

Work is keyed by `moedisco.job.registry.Task.key`. Workers push events to an `EventQueue` actor (fire and forget, so
a slow driver never slows training), which the driver drains while it waits, so that every event reaches the job's
callback from the driver's thread. Trainers are submitted while fewer than `limit` of their stage run
(`resources.max_parallel`); a submitted trainer waits inside Ray Train for its tier's nodes, its pending placement
group being the demand an autoscaler reads. An expert is `waiting`, `running` once rank 0 starts, then `done` (or
`preempted`, `cancelled`); steps a restart trains twice are counted per trainer (`WorkDone`), and preemptions apart
from `max_failures`. A cancel raises the queue's stop flag, which workers read at their next checkpoint; a trainer
not stopped within `STOP_GRACE_S` is killed with the launcher, and the placement groups its killed controller leaves
behind, which Ray Train's cleaner does not know, are removed (`remove_orphaned_placement_groups`). Every process
that holds a node for a piece of work says so (`moedisco.job.events.NodeUse`, open as it starts, closed as it ends);
`NodeUses` passes each on as it comes and closes, with the driver's clock, what a killed or cancelled one left
open, so that `tracker.node_uses.take(key)` gives the work's node time, every use closed. With a
`capacity` clock, work submitted with its `Demand` that waits `resources.capacity_timeout_s` for nodes its tier
never gets raises `CapacityTimeout` from `wait` (`ray_cluster.capacity`); the job's close then cancels it all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray

from moedisco.job.events import Event, ExpertState, JobCancelledEvent, NodeUse, Progress, WorkerStarted
from ray_cluster.capacity import CapacityClock, CapacityTimeout, Demand, TierState, autoscaler_note, tier_state
from ray_cluster.placement import on_driver_node

log = logging.getLogger(__name__)
Key = tuple[str, int | None]  # (stage, expert): `moedisco.job.registry.Task.key`
UseId = tuple[str, int, float]  # `NodeUse.use_id`: (node, pid, start)
STOP_GRACE_S = 60.0
RAY_CALL_TIMEOUT_S = 60.0
ORPHAN_WAIT_S = 10.0  # for the killed launcher's controllers to be marked dead


@dataclass
class WorkDone:
    """One trainer's steps across its restarts: how far it got, and what restarts made it train twice.

    When a worker starts again (Ray Train restarting a failed worker group, or the driver a preempted trainer), the
    steps between the furthest step its predecessor reported and the checkpoint it starts from are trained twice.
    A preempted worker reports the exact step it checkpointed, so its restart loses none; a killed one is known only
    up to its last logged step (`eval_every`), so what it lost past that is not counted."""

    reached: int = 0  # the furthest step reported
    first_step: int | None = None  # where its first worker started
    lost_steps: int = 0
    preemptions: int = 0
    preempted_seconds: float = 0.0  # node time of its runs that ended in a preemption

    def started(self, resume_step: int | None) -> None:
        if resume_step is None:
            return
        if self.first_step is None:
            self.first_step = self.reached = resume_step
        self.lost_steps += max(0, self.reached - resume_step)

    def summary(self, final_step: int) -> dict:
        """`steps_run`: every step trained, redone ones included (what the trainer's node time paid for)."""
        run = final_step - (self.first_step or 0) + self.lost_steps
        return {"lost_steps": self.lost_steps, "steps_run": run, "preemptions": self.preemptions}


class NodeUses:
    """The node uses of each piece of work since its summary last took them, as its workers report them, passed on
    to `emit` as they come. What a worker could not close, the driver closes at its own `time.time()`:

    - a trainer's worker group that Ray Train restarted: at the next group's start (`workers_started`);
    - a task of one process (`one_process`) that Ray ran again: at its next attempt's open use;
    - anything still open once the work's result arrived (`close`), or the job was cancelled (`close_all`).
    """

    def __init__(self, emit: Callable[[Event], None]):
        self.emit = emit
        self.uses: dict[Key, dict[UseId, NodeUse]] = {}
        self.since_start: dict[Key, set[UseId]] = {}  # a trainer's uses opened since its workers last started
        self.taken: set[UseId] = set()  # in a summary already: a late report of one is not counted again

    def add(self, use: NodeUse, one_process: bool = False) -> None:
        key, uses = (use.stage, use.expert), self.uses.setdefault((use.stage, use.expert), {})
        known = uses.get(use.use_id)
        if use.use_id in self.taken or (known is not None and known.end is not None):
            return  # closed already (by the driver, when the worker's own report came late)
        if use.end is None and one_process:
            self.close(key)  # a retried task: its earlier attempt's process is gone
        uses[use.use_id] = use
        if use.end is None:
            self.since_start.setdefault(key, set()).add(use.use_id)
        self.emit(use)

    def workers_started(self, key: Key) -> None:
        """A trainer's worker group started: its workers' open uses came before (`ray_cluster.worker.train`), so the
        other open ones are an earlier group's, which Ray Train killed to restart it."""
        self.close(key, keep=frozenset(self.since_start.pop(key, ())))

    def close(self, key: Key, keep: frozenset[UseId] = frozenset()) -> None:
        uses = self.uses.get(key, {})
        for use_id, use in uses.items():
            if use.end is None and use_id not in keep:
                uses[use_id] = use.model_copy(update={"end": max(time.time(), use.start)})
                self.emit(uses[use_id])

    def close_all(self) -> None:
        for key in self.uses:
            self.close(key)

    def take(self, key: Key) -> list[dict]:
        """The work's uses, every one closed, as JSON (`summary["node_uses"]`); forgotten here."""
        self.close(key)
        self.since_start.pop(key, None)
        uses = self.uses.pop(key, {})
        self.taken.update(uses)
        return [use.model_dump(mode="json") for use in uses.values()]


@ray.remote
class EventQueue:
    """Events from workers to the driver, and the driver's stop request back to the workers."""

    def __init__(self):
        self.events: list[Event] = []
        self.stop = False

    def push(self, event: Event) -> None:
        self.events.append(event)

    def drain(self) -> list[Event]:
        events, self.events = self.events, []
        return events

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop


def remove_orphaned_placement_groups() -> int:
    """Remove this driver's placement groups whose creator actor is dead (a trainer's controller killed before
    its workers started); returns how many. Read from the GCS table, the one place that records the creator."""
    from ray._private.state import state
    from ray.core.generated.gcs_pb2 import PlacementGroupTableData
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job_id = ray.get_runtime_context().get_job_id()
    removed = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        group = PlacementGroupTableData.FromString(raw)
        if (group.creator_actor_dead and not group.is_detached and group.creator_job_id.hex() == job_id
                and group.state != PlacementGroupTableData.REMOVED):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(group.placement_group_id)))
            removed += 1
    return removed


class Tracker:
    def __init__(self, emit: Callable[[Event], None], should_stop: Callable[[], bool] | None, poll_s: float = 0.5,
                 capacity: CapacityClock | None = None, on_use: Callable[[NodeUse], None] | None = None):
        self.emit, self.should_stop, self.poll_s, self.capacity = emit, should_stop, poll_s, capacity
        self.on_use = on_use  # told of every node use a worker opens (the executor's round holds)
        remove_orphaned_placement_groups()  # left by an earlier job of this driver that was cancelled
        self.queue = EventQueue.options(**on_driver_node()).remote()
        self._launcher = None
        self.queued: list[tuple[Key, Callable[[], ray.ObjectRef], int]] = []
        self.pending: dict[Key, ray.ObjectRef] = {}
        self.trainers: set[Key] = set()
        self.states: dict[Key, str] = {}
        self.first_start: dict[Key, float] = {}
        self.attempts: dict[Key, int] = {}
        self.work: dict[Key, WorkDone] = {}
        self.actors: dict[Key, ray.actor.ActorHandle] = {}
        self.one_process: set[Key] = set()
        self.node_uses = NodeUses(emit)

    @property
    def launcher(self):
        """The actor whose threads run this job's `trainer.fit()` calls; started on first use."""
        if self._launcher is None:
            from ray_cluster.prestart import start_launcher

            self._launcher = start_launcher()
        return self._launcher

    def adopt_launcher(self, launcher) -> None:
        """Use a launcher started ahead of time (`ray_cluster.prestart`); killed with the job's trainers."""
        self._launcher = launcher

    def submit(self, key: Key, ref: ray.ObjectRef, actor=None, one_process: bool = False,
               demand: Demand | None = None) -> None:
        """Track a task's result, or an actor method's (`actor`: cancelling kills that actor); `one_process`: its
        work runs in one process at a time (a Ray task, not a Ray Data pool), so a new attempt ends the last;
        `demand`: the nodes it waits for, on the capacity clock."""
        self.pending[key] = ref
        self.demanded(key, demand)
        if actor is not None:
            self.actors[key] = actor
        if one_process:
            self.one_process.add(key)

    def enqueue(self, key: Key, start: Callable[[], ray.ObjectRef], limit: int, demand: Demand | None = None) -> None:
        """Queue a trainer; `start()` submits it once fewer than `limit` trainers of its stage are running. Its wait
        for nodes counts from now (while others of its tier run, it waits on them, not on the cluster)."""
        self.queued.append((key, start, limit))
        self.demanded(key, demand)
        self.trainers.add(key)
        self.set_state(key, "waiting")

    def running_trainers(self, stage: str) -> int:
        """Trainers of `stage` submitted and not finished; the finished ones are marked done on the way."""
        refs = {ref: key for key, ref in self.pending.items() if key in self.trainers and key[0] == stage}
        if not refs:
            return 0
        finished, running = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        for ref in finished:
            self.set_state(refs[ref], "done")
        return len(running)

    def demanded(self, key: Key, demand: Demand | None) -> None:
        if self.capacity is not None and demand is not None:
            self.capacity.submitted(key, demand, time.monotonic())

    def start_queued(self) -> None:
        for item in list(self.queued):
            key, start, limit = item
            if self.running_trainers(key[0]) < limit:
                self.queued.remove(item)
                self.pending[key] = start()

    def set_state(self, key: Key, state: str) -> None:
        if self.states.get(key) != state:
            self.states[key] = state
            self.emit(ExpertState(stage=key[0], expert=key[1], state=state, attempt=self.attempts.get(key, 0)))

    def wait(self, key: Key) -> dict:
        """Block until the work under `key` returns its summary, pumping events and starting queued trainers."""
        while True:
            self.start_queued()
            if key in self.pending and ray.wait([self.pending[key]], timeout=self.poll_s)[0]:
                break
            self.pump()
            self.check_capacity()
        ref = self.pending.pop(key)
        if self.capacity is not None:
            self.capacity.finished(key, time.monotonic())
        summary = ray.get(ref)
        self.actors.pop(key, None)
        self.pump()  # events the worker pushed just before returning
        self.node_uses.close(key)  # a Ray Data pool's actors, which say only that they started
        if key in self.trainers and not summary.get("preempted"):  # a preempted one starts again (`preempted`)
            self.set_state(key, "done")
        return summary

    def check_capacity(self) -> None:
        """Raise `CapacityTimeout` once some work has waited `capacity_timeout_s` for a tier that makes no
        progress. Work that holds a node counts as running until its result is ready, which is asked here, since
        `wait` takes results one at a time, in order."""
        clock = self.capacity
        if clock is None or not clock.waiting():
            return
        now = time.monotonic()
        running = {self.pending[key]: key for key in clock.running() if key in self.pending}
        if running:
            ready, _ = ray.wait(list(running), num_returns=len(running), timeout=0, fetch_local=False)
            for ref in ready:
                clock.finished(running[ref], now)
        gcs_address = ray.get_runtime_context().gcs_address

        def cluster(demand: Demand) -> TierState:
            try:
                return tier_state(gcs_address, demand)
            except Exception as error:  # noqa: BLE001 - unknown is not starved: the job is not failed on a guess
                log.warning("could not read the cluster's state of %s: %s", demand.selector, error)
                return TierState(num_pending=0, num_busy=0)

        starved = clock.starved(now, cluster)
        if starved is not None:
            raise CapacityTimeout(starved, autoscaler_note(starved.demand, gcs_address))

    def billed_seconds(self, key: Key, summary: dict) -> float:
        """Node time from the first start of the trainer's workers to its end, plus that of its preempted runs:
        waiting for nodes is not billed."""
        seconds = summary["finished_at"] - self.first_start.get(key, summary["started_at"])
        return seconds + self.work_done(key).preempted_seconds

    def work_done(self, key: Key) -> WorkDone:
        return self.work.setdefault(key, WorkDone())

    def preempted(self, key: Key, summary: dict) -> None:
        """A trainer returned after checkpointing on a preemption notice: bill its run, count it; it is started
        again (by the executor) from `summary["step"]`."""
        work = self.work_done(key)
        work.preempted_seconds = self.billed_seconds(key, summary)  # this run's and the earlier preempted ones'
        work.preemptions += 1
        work.reached = max(work.reached, summary["step"])
        self.first_start.pop(key, None)
        self.states[key] = "preempted"
        self.emit(ExpertState(stage=key[0], expert=key[1], state="preempted", attempt=self.attempts.get(key, 0),
                              step=summary["step"]))

    def forget(self, key: Key) -> None:
        """Drop a finished trainer's start time, attempt count and work record, so that the key can be queued
        again."""
        self.first_start.pop(key, None)
        self.attempts.pop(key, None)
        self.work.pop(key, None)

    def pump(self) -> None:
        for event in self.drain():
            self.handle(event)
        if self.should_stop is not None and self.should_stop():
            # Imported here: the job's EventQueue actor unpickles this module, and the runner imports torch.
            from moedisco.runner.job_runner import JobCancelled

            self.cancel_all()
            self.emit(JobCancelledEvent())
            raise JobCancelled("the job was cancelled; finished stages and checkpoints are kept")

    def drain(self) -> list[Event]:
        return ray.get(self.queue.drain.remote(), timeout=RAY_CALL_TIMEOUT_S)

    def handle(self, event: Event) -> None:
        key = (event.stage, event.expert)
        # Only an open use: a closed one may be a preempted run's, come after its trainer was queued again.
        arrived = isinstance(event, WorkerStarted) or (isinstance(event, NodeUse) and event.end is None)
        if arrived and self.capacity is not None:
            self.capacity.arrived(key, time.monotonic())
        if isinstance(event, NodeUse):
            self.node_uses.add(event, one_process=key in self.one_process)
            if event.end is None and self.on_use is not None:
                self.on_use(event)
        elif isinstance(event, WorkerStarted):
            self.node_uses.workers_started(key)
            self.work_done(key).started(event.resume_step)
            self.first_start.setdefault(key, event.time)
            self.attempts[key] = self.attempts.get(key, 0) + 1
            self.states.pop(key, None)  # a restart after a failure is announced again
            self.set_state(key, "running")
        elif isinstance(event, Progress):
            self.work_done(key).reached = max(self.work_done(key).reached, event.step)
            self.emit(event)

    def close(self) -> None:
        """Stop what is still running and free this job's helper actors (the service runs many jobs per process)."""
        self.cancel_all()
        ray.kill(self.queue)

    def remove_orphans_of_killed_controllers(self) -> None:
        """The controllers die a moment after their launcher; wait for the GCS to mark them, removing what they
        leave, until a pass finds nothing after the first few seconds."""
        killed_at = time.monotonic()
        while time.monotonic() - killed_at < ORPHAN_WAIT_S:
            if not remove_orphaned_placement_groups() and time.monotonic() - killed_at > 3.0:
                return
            time.sleep(self.poll_s)

    def cancel_all(self) -> None:
        """Stop every trainer (gracefully, else by force) and cancel every task; wait until they are gone."""
        for key, _, _ in self.queued:
            self.set_state(key, "cancelled")
        self.queued.clear()
        # Only trainers whose workers run can stop at a checkpoint; one still waiting for nodes goes with the
        # launcher at once, or a cancel would wait out the grace period for it.
        trainer_refs = [ref for key, ref in self.pending.items()
                        if key in self.trainers and self.states.get(key) == "running"]
        if trainer_refs:
            ray.get(self.queue.request_stop.remote(), timeout=RAY_CALL_TIMEOUT_S)
            ray.wait(trainer_refs, num_returns=len(trainer_refs), timeout=STOP_GRACE_S)
        if self._launcher is not None:
            ray.kill(self._launcher)  # its fit() threads own the controllers of any trainer that did not stop
            self._launcher = None
            if any(key in self.trainers for key in self.pending):
                self.remove_orphans_of_killed_controllers()
        task_refs = [ref for key, ref in self.pending.items() if key not in self.trainers]
        for key, ref in self.pending.items():
            if key in self.actors:
                ray.kill(self.actors.pop(key))  # force-cancelling is for tasks; an actor method stops with it
            elif key not in self.trainers:
                ray.cancel(ref, force=True, recursive=True)
        if task_refs:
            ray.wait(task_refs, num_returns=len(task_refs), timeout=RAY_CALL_TIMEOUT_S)
        for key in self.pending:
            if key in self.trainers:
                self.set_state(key, "cancelled")
        self.pending.clear()
        if self.capacity is not None:
            self.capacity.clear()
        self.close_node_uses()

    def close_node_uses(self) -> None:
        """The uses the stopped workers closed as they ended, then the rest closed: nothing of the job runs now.
        Only uses: the other events of work that was cancelled are past news."""
        if any(use.end is None for uses in self.node_uses.uses.values() for use in uses.values()):
            try:
                for event in self.drain():
                    if isinstance(event, NodeUse):
                        self.node_uses.add(event)
            except (ray.exceptions.RayError, TimeoutError) as error:
                log.warning("could not read the last events of the job's workers: %s", error)
        self.node_uses.close_all()
