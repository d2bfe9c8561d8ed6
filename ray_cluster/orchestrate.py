"""Run a whole job on Ray: moedisco's `JobRunner` with the `RayExecutor`, which places each task on its tier.

    summary = run_job_on_ray(load_spec("examples/tiny.yaml"))                    # fresh local simulated cluster
    summary = run_job_on_ray(spec, address="10.0.0.5:6379", events=store.add, should_stop=job.cancelled)

The runner keeps the books (markers, budget, events, cost ledger; `moedisco.runner.job_runner`); the executor only
decides where each task of the plan (`moedisco.job.registry.plan`) runs. A data stage runs as
`ray_cluster.data.stages.DATA_STAGES` says (on Ray Data, in a Ray task, or in the job's data worker); a training
stage is one Ray Train trainer per task on its tier (`ray_cluster.trainers`), a round's experts all submitted at
once (`resources.max_parallel` caps them) to wait in Ray for nodes; sync and merge are a Ray task on the cheap tier
that reads the checkpoints from storage. Every placement asks for what its tier declares, and before the first
stage the job checks that each tier's label is on some node or that an autoscaler may add one, so that a job never
waits for a pod that cannot come; work that then waits `resources.capacity_timeout_s` for nodes its tier never
gets (a quota, a stock-out, a node group at zero) fails the job with `CapacityTimeout`, naming the stage, label and
resources it waited for (`ray_cluster.capacity`), and the job's close gives back all it asked for. Re-running a job
whose driver died skips finished stages and resumes the interrupted one from its checkpoints; `should_stop()`
turning true cancels the job (`JobCancelled`). Every task's summary lists the node time its workers held
(`summary["node_uses"]`: closed `NodeUse`s as JSON, a trainer's restarts and preempted runs included), which the
events carried live as they came.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator

import ray

from moedisco.config.spec import JobSpec
from moedisco.io.storage import join, remove_tree
from moedisco.job.events import Events, NodeUse
from moedisco.job.registry import STAGE, Task, submodel_task
from moedisco.planning.billing import NodeLife
from moedisco.runner.job_runner import BudgetLeft, JobCancelled, JobContext, JobRunner, Started
from ray_cluster import prestart
from ray_cluster.auth import connect
from ray_cluster.capacity import CapacityClock, Demand
from ray_cluster.data.data_worker import data_stages_in_one_process, start_data_worker
from ray_cluster.data.shards import NO_RAY_DATA_SCALE_UP
from ray_cluster.data.stages import DATA_STAGES
from ray_cluster.local_cluster import LocalClusterSpec, start_local_cluster, stop_local_cluster, wants_token
from ray_cluster.metering import NodeMeter
from ray_cluster.node_uses import NodeUseReporter, RoundHolds, driver_use
from ray_cluster.placement import (
    TierUnreachable,
    autoscaler_present,
    check_output_dir,
    check_tiers_reachable,
    on_driver_node,
    placement_tier,
    run_name,
    run_stage_on_tier,
    storage_root,
    task_options,
    tier_capacity,
)
from ray_cluster.tracking import Tracker
from ray_cluster.trainers import build_trainer

log = logging.getLogger(__name__)


class RayExecutor:
    """Places each task of a job on its tier of a Ray cluster (the `moedisco.runner.job_runner.Executor` interface)."""

    shards = True  # a trainer with several workers shards its model over them (FSDP2)

    def __init__(self):
        self.tracker: Tracker | None = None
        self.data_worker = None
        self.meter: NodeMeter | None = None
        self.holds: RoundHolds | None = None
        self.driver: NodeUse | None = None
        self.autoscaled = False

    def open(self, job: JobContext) -> None:
        self.job, self.spec, self.paths = job, job.spec, job.paths
        helpers = prestart.take_prestarted(self.spec)
        try:
            check_tiers_reachable(self.spec)  # else the first placement on a missing tier waits forever
        except TierUnreachable:
            prestart.stop_helpers(helpers)
            raise
        self.autoscaled = autoscaler_present(self.spec)
        self.holds = RoundHolds(job.events)
        self.tracker = Tracker(job.events, job.should_stop,
                               capacity=CapacityClock(self.spec.resources.capacity_timeout_s),
                               on_use=self.work_started)
        helpers = helpers or prestart.start_helpers(self.spec)
        self.tracker.adopt_launcher(helpers.launcher)
        self.data_worker = helpers.data_worker
        # The nodes' lives, for the billed cost; with an autoscaler, when each node was asked for.
        self.meter = NodeMeter(self.spec.resources).start(watch_launches=self.autoscaled)
        self.driver = driver_use()  # this driver's slot on a CPU node, billed to the job while it runs
        if self.driver is not None:
            job.events(self.driver)

    def run(self, tasks: list[Task], started: Started) -> Iterator[tuple[Task, dict]]:
        if not STAGE[tasks[0].stage].setup:
            self.stop_data_worker()  # its node is the first trainer's
        if tasks[0].stage not in ("sync", "submodel"):
            self.holds.release()  # the rounds are over
        for task in tasks:
            started(task)
            self.submit(task)
        for task in tasks:
            yield task, self.result(task)

    def done(self, task: Task) -> None:
        if task.stage == "sync":
            self.drop_round_runs(task.round)

    def node_lives(self) -> list[NodeLife]:
        if self.meter is None:
            return []
        self.meter.poll()  # now: a node the last poll missed (one that came and went) is billed too
        return self.meter.lives()

    def close(self) -> None:
        if self.holds is not None:
            self.holds.release()
        if self.driver is not None:
            self.job.events(self.driver.model_copy(update={"end": time.time()}))
            self.driver = None
        self.stop_data_worker()
        if self.tracker is not None:
            self.tracker.close()  # after an error or a cancel nothing of this job keeps running
        if self.meter is not None:
            self.meter.stop()

    # --- placement ----------------------------------------------------------------------------------------------

    def work_started(self, use: NodeUse) -> None:
        """A worker of the job opened a use of its node: a node held for the next round is given back once that
        round's work (or the merge) is on it; the sync, which ends before the next round starts, keeps the hold."""
        if use.stage != "sync":
            self.holds.release(use.node)

    def submit(self, task: Task) -> None:
        if STAGE[task.stage].trained:
            self.launch_trainer(task)
        elif STAGE[task.stage].setup:
            self.submit_setup(task)
        else:  # sync, merge: work on the checkpoints in storage, on a cheap node
            tier = placement_tier(self.spec, task.stage)
            self.remote(task, run_stage_on_tier, self.job.stage_run(task), tier, self.reporter(task),
                        options=task_options(self.spec, tier))

    def submit_setup(self, task: Task) -> None:
        spec, stage = self.spec, DATA_STAGES[task.stage]
        if stage.on_ray_data and self.data_worker is None and data_stages_in_one_process(spec):
            self.data_worker = start_data_worker(spec)  # the corpus's size was known only after prepare
        if task.stage == "source":
            self.submit_source(task)
        elif self.data_worker is not None:
            ref = self.data_worker.run.remote(self.job.stage_run(task), self.reporter(task))
            # Whatever the stage, the data worker waits for a cheap node (`start_data_worker`).
            self.tracker.submit(task.key, ref, actor=self.data_worker, one_process=True,
                                demand=self.demand("submodel_tier"))
        elif stage.on_ray_data:  # coordinates an actor pool that grows over its tier; its workers report their uses
            max_nodes = tier_capacity(spec, placement_tier(spec, task.stage))
            options = {**on_driver_node(), "runtime_env": {"env_vars": NO_RAY_DATA_SCALE_UP}}
            self.remote(task, stage.on_ray_data, spec, self.paths, max_nodes, options=options,
                        reporter=self.reporter(task), one_process=False)

    def submit_source(self, task: Task) -> None:
        """The whole model in host memory (`host_memory.source_plan`, checked against one node of its tier before
        the job started): a task of its own on the CPU tier, never in the data worker on a cheap node."""
        tier = placement_tier(self.spec, task.stage)
        self.remote(task, run_stage_on_tier, self.job.stage_run(task), tier, self.reporter(task),
                    options=task_options(self.spec, tier))

    def remote(self, task: Task, function, *args, options: dict | None = None, one_process: bool = True,
               **kwargs) -> None:
        """A Ray task; every stage outside Ray Train is idempotent, so a lost node or a preempted pod re-runs it
        (up to `resources.max_failures` times, as a trainer restarts). It, or the actor pool it coordinates, waits
        for nodes of the stage's tier."""
        retries = self.spec.resources.max_failures
        ref = ray.remote(function).options(max_retries=retries, **(options or {"num_cpus": 1})).remote(*args, **kwargs)
        self.tracker.submit(task.key, ref, one_process=one_process, demand=self.demand(STAGE[task.stage].tier))

    def demand(self, tier: str) -> Demand:
        """What work placed on `tier` (a `ResourcesConfig` field) waits for, on the tracker's capacity clock."""
        return Demand.of(self.spec, tier, self.autoscaled)

    def reporter(self, task: Task) -> NodeUseReporter:
        """What the task's workers say their node uses with (`node_uses.NodeUseReporter`)."""
        return NodeUseReporter(self.tracker.queue, task.ids)

    def launch_trainer(self, task: Task) -> None:
        """Queue a trainer; up to `resources.max_parallel` of a stage (default: all) are submitted at once. How many
        run at once is then up to the cluster: each submitted trainer waits in Ray for its tier's nodes, and its
        pending placement group is what tells an autoscaler to add one (from zero pods, as many as are asked)."""
        spec = self.spec

        def start():
            trainer = build_trainer(spec, task, events=self.tracker.queue, runner_id=self.job.runner_id)
            return self.tracker.launcher.fit.remote(trainer)

        self.tracker.enqueue(task.key, start, max_parallel(spec), demand=self.demand(STAGE[task.stage].tier))

    def result(self, task: Task) -> dict:
        """The task's summary, with `node_uses`: the node uses of all its runs (restarts included), closed, as JSON;
        a data stage's actor pool, which grew with the nodes, counts the nodes it held."""
        summary = self.stage_summary(task)
        uses = self.tracker.node_uses.take(task.key)
        if STAGE[task.stage].setup and uses:
            summary = {**summary, "num_nodes": len({use["node"] for use in uses})}
        last_round = self.spec.branch.sync_rounds - 1
        if task.stage == "submodel" and task.round is not None and task.round < last_round:
            self.holds.hold(task, nodes=list(dict.fromkeys(use["node"] for use in uses)))  # for the next round
        return {**summary, "node_uses": uses}

    def stage_summary(self, task: Task) -> dict:
        summary = self.tracker.wait(task.key)
        while summary.get("preempted"):  # checkpointed on notice: only this trainer starts again, from there
            log.warning("%s[%s] preempted at step %s (%s; its checkpoint: %s); starting it again", task.stage,
                        task.expert, summary["step"], summary.get("reason"), summary.get("notice_checkpoint"))
            self.tracker.preempted(task.key, summary)
            limit = self.spec.resources.max_preemptions
            if limit is not None and self.tracker.work_done(task.key).preemptions > limit:
                raise RuntimeError(f"{task.stage}[{task.expert}] was preempted more than resources.max_preemptions "
                                   f"({limit}) times")
            self.launch_trainer(task)
            summary = self.tracker.wait(task.key)
        if not STAGE[task.stage].trained:
            return summary if STAGE[task.stage].setup else {**summary, "num_nodes": 1}
        if summary.get("claim_lost"):
            self.job.may_write()  # raises ClaimLost: the folder is another runner's
        if summary.get("stopped"):
            raise JobCancelled(f"{task.stage} stopped on request")
        billed = self.tracker.billed_seconds(task.key, summary)
        work = self.tracker.work_done(task.key).summary(summary["steps"])
        self.tracker.forget(task.key)  # the next synchronisation round's trainer reuses the key
        return {**summary, **work, "train_seconds": summary["seconds"], "seconds": billed}

    # --- helpers ------------------------------------------------------------------------------------------------

    def drop_round_runs(self, round_index: int) -> None:
        """A synced round's Ray Train runs: their reported checkpoint copies are never read again (the next round
        is a run of its own and resumes from the synced checkpoints in the job folder)."""
        for expert in range(self.spec.num_clusters):
            run = run_name(self.spec, submodel_task(self.spec, expert, round_index))
            remove_tree(join(storage_root(self.spec), run))

    def stop_data_worker(self) -> None:
        if self.data_worker is not None:
            ray.kill(self.data_worker)
            self.data_worker = None


def max_parallel(spec: JobSpec) -> int:
    """Trainers of one stage submitted at once: the job's cap, else every expert of a round."""
    return spec.resources.max_parallel or spec.num_clusters


@contextlib.contextmanager
def ray_connection(spec: JobSpec, address: str | None) -> Iterator[str]:
    """Reuse an initialised Ray, else connect to `address` (or RAY_ADDRESS), else start a local simulated cluster
    that autoscales: a head alone, and Ray's autoscaler adding the node groups' nodes as the job asks for them.

    Whatever this function started or connected it also stops; an already-initialised Ray is left as it was. A
    cluster that refuses this client for want of its Ray token raises `ray_cluster.auth.RayAuthError`, which says
    what to set (RAY_AUTH_MODE=token and the token); the detached local cluster's token is sent unasked.
    """
    if ray.is_initialized():
        yield "existing"
        return
    address = address or os.environ.get("RAY_ADDRESS")
    started_cluster = address is None
    if started_cluster:
        address = start_local_cluster(spec=LocalClusterSpec.from_resources(spec.resources, autoscale=True))
    try:
        # Worker output goes to the session logs and the dashboard; the driver shows progress instead.
        connect(address, token_expected=wants_token(address), log_to_driver=False, logging_level=logging.WARNING)
        yield address
    finally:
        ray.shutdown()
        if started_cluster:
            stop_local_cluster()


def run_job_on_ray(spec: JobSpec, address: str | None = None, events: Events | None = None,
                   should_stop: Callable[[], bool] | None = None, runner_id: str | None = None,
                   budget_left: BudgetLeft | None = None) -> dict:
    """Run `spec` on a Ray cluster, idempotently; returns {"output_dir", "final", "cost"} like `run_job`."""
    with ray_connection(spec, address):
        nodes = [node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]]
        check_output_dir(spec, nodes, ray.util.get_node_ip_address())
        return JobRunner(spec, RayExecutor(), events, should_stop, runner_id, budget_left).run()

