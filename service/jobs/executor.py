"""Runs one job and writes everything it does into the store; `JobActor` is that, as a detached Ray actor.

    execute_job(Store(url), job_id, runner="local")          # in any process: what the actor does
    ray.remote(JobActor).options(name=..., lifetime="detached").remote(url).run.remote(job_id, "ray")

The actor talks to the store directly, not to the API, so a job keeps running and recording while the API
process (a Serve replica, a uvicorn process) is restarted. Re-running a job on its output_dir resumes it: finished
stages are skipped and an interrupted training stage continues from its last checkpoint, which is what makes
relaunching a lost runner safe. Two runners never work on one job: each holds the job's lease in the store
(`Lease`), and its claim on the job folder fences off one that was taken for dead (`moedisco.job.layout.ClaimLost`).
A runner whose Ray session no longer dispatches (a newer control plane, on another cluster, holds the store's
dispatch lease: an upgrade) stops at its next checkpoint and gives the job up, which that control plane relaunches.
"""

from __future__ import annotations

import copy
import logging
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING

from moedisco.config.loading import SpecError, build_spec, upgrade_saved_spec
from moedisco.config.spec import JobSpec
from moedisco.job.events import Events, RunnerEvent
from moedisco.job.layout import ClaimLost
from service.core.config import AccessRules
from service.jobs.access import input_errors, owner_as_reader
from service.jobs.recorder import EventRecorder
from service.store.models import utcnow
from service.store.store import Store
from service.store.users import Users

if TYPE_CHECKING:
    from moedisco.runner.job_runner import BudgetLeft  # the runner (torch) is imported only where a job runs

log = logging.getLogger(__name__)

ShouldStop = Callable[[], bool]


def _run_local(spec: JobSpec, events: Events, should_stop: ShouldStop, runner_id: str,
               budget_left: BudgetLeft | None = None) -> dict:
    from moedisco.runner.job_runner import run_job

    return run_job(spec, events=events, progress=False, should_stop=should_stop, runner_id=runner_id,
                   budget_left=budget_left)


def _run_ray(spec: JobSpec, events: Events, should_stop: ShouldStop, runner_id: str,
             budget_left: BudgetLeft | None = None) -> dict:
    from ray_cluster.orchestrate import run_job_on_ray  # written in parallel: import only when used

    return run_job_on_ray(spec, events=events, should_stop=should_stop, runner_id=runner_id, budget_left=budget_left)


RUNNERS = {"local": _run_local, "ray": _run_ray}


def prestart_ray_helpers(spec: JobSpec) -> None:
    """Start the job's Ray helpers (trainers' launcher, data worker) before this process's heavy imports (the
    estimate's, the runner's), so that theirs run alongside; the Ray runner adopts them."""
    try:
        from ray_cluster.prestart import prestart_job

        prestart_job(spec)
    except Exception as error:  # the runner starts them itself, or reports what is wrong with Ray
        log.warning("job %s: helpers not started ahead (%s)", spec.name, error)


def record_estimate(store: Store, job_id: str, spec: JobSpec) -> None:
    """The FLOP-model estimate (with its full-parameter baseline), computed here so the API never loads models."""
    try:
        from moedisco.planning.estimate import cost_estimate

        store.set_estimate(job_id, cost_estimate(spec))
    except Exception as error:  # an estimate is a nicety; the job runs without it
        log.warning("job %s: no cost estimate (%s)", job_id, error)


HANDOVER_CHECK_S = 5.0  # how soon a runner learns that another cluster's control plane dispatches


class Lease:
    """This runner's lease on a job in the store, renewed from a thread every third of `ttl_s` (at least every
    HANDOVER_CHECK_S) while the job runs, so that a dispatcher (of this cluster, or of the next one during an upgrade)
    relaunches the job only once nobody has renewed it for `ttl_s`. The runner's id is also its claim on the job
    folder (`moedisco.job.layout.claim`): a runner taken for dead that wakes up finds another runner's claim there
    and stops before it writes.

    `ray_session`: the Ray session the runner runs in. Once a control plane of another session holds the dispatch
    lease (`Store.hold_dispatch`), `check()` says stop: the runner ends at its next checkpoint and hands the job
    over."""

    def __init__(self, store: Store, job_id: str, ttl_s: float, ray_session: str | None = None):
        self.store, self.job_id, self.ttl_s, self.ray_session = store, job_id, ttl_s, ray_session
        self.runner_id = uuid.uuid4().hex
        self.lost, self.handing_over = threading.Event(), threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{job_id}", daemon=True)

    def claim(self) -> bool:
        return self.store.claim_lease(self.job_id, self.runner_id, utcnow() - timedelta(seconds=self.ttl_s))

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def renew(self) -> None:
        """Renew now; raise `ClaimLost` once another runner holds the lease (this one was taken for dead)."""
        if not self.lost.is_set() and not self.store.renew_lease(self.job_id, self.runner_id):
            log.warning("job %s: runner %s lost its lease to another runner", self.job_id, self.runner_id)
            self.lost.set()
        self.check()
        if self.ray_session is not None and not self.handing_over.is_set() and self.dispatched_elsewhere():
            log.warning("job %s: a control plane of another cluster dispatches now; handing the job over at its "
                        "next checkpoint", self.job_id)
            self.handing_over.set()

    def dispatched_elsewhere(self) -> bool:
        holder = self.store.dispatch_holder()
        return (holder is not None and holder.ray_session not in (None, self.ray_session)
                and holder.heartbeat_at >= utcnow() - timedelta(seconds=self.ttl_s))

    def check(self) -> bool:
        """What a `should_stop` adds: True once the job is to be handed over; `ClaimLost` once the lease is lost."""
        if self.lost.is_set():
            raise ClaimLost(f"job {self.job_id}: another runner holds its lease")
        return self.handing_over.is_set()

    def hand_over(self) -> None:
        self.store.release_lease(self.job_id, self.runner_id)

    def _renew(self) -> None:
        while not self._stop.wait(min(self.ttl_s / 3, HANDOVER_CHECK_S)):
            try:
                self.renew()
            except ClaimLost:
                return
            except Exception:  # a database hiccup: the next renewal may succeed before the lease goes stale
                log.exception("job %s: could not renew the lease", self.job_id)


def execute_job(store: Store, job_id: str, runner: str, lease_ttl_s: float = 60.0,
                rules: AccessRules | None = None, ray_session: str | None = None, node: str | None = None
                ) -> str | None:
    """Run a `running` job to a terminal state; returns that state (None when the job was not running, another
    runner holds its lease, took it over while this one ran, or this one handed it over). With `rules`, the job's
    inputs are checked again for its owner (`service.jobs.access`) before it runs: an owner who lost a job or an
    admin right since submitting cannot have it read what is no longer theirs. `ray_session`, `node`: the Ray session
    and node this runner runs in (a job actor's), recorded in the job's `runner` events."""
    job = store.get_job(job_id)
    if job is None or job.state != "running":
        return None
    lease = Lease(store, job_id, lease_ttl_s, ray_session)
    if not lease.claim():
        log.warning("job %s: another runner holds its lease; not running it twice", job_id)
        return None
    recorder = EventRecorder(store, job_id, job.output_dir)

    def said(state: str) -> None:
        recorder(RunnerEvent(runner=lease.runner_id, state=state, ray_session=ray_session, node=node))

    said("started")
    with lease:
        outcome = _execute(store, job, runner, lease, rules, recorder)
    if outcome == HANDED_OVER:
        said("handed_over")  # before the lease is free: the next runner's events come after it
        lease.hand_over()
        return None
    if outcome is not None:
        said("ended")
    return outcome


def _execute(store: Store, job, runner: str, lease: Lease, rules: AccessRules | None,
             recorder: EventRecorder) -> str | None:
    job_id, runner_id = job.id, lease.runner_id
    refused = [] if rules is None else input_errors(copy.deepcopy(job.spec), owner_as_reader(store, job.owner), rules)
    if refused:
        reasons = "; ".join(f"{'.'.join(map(str, found['loc'][1:]))}: {found['msg']}" for found in refused)
        return _finish(store, job_id, recorder, "failed", f"inputs refused: {reasons}", runner_id=runner_id)
    raw = upgrade_saved_spec(job.spec)  # stored in full when submitted, perhaps by an older version
    # Priced as the operator prices now (`max_cost_usd` too), whatever it was submitted with.
    raw["resources"] = {**(raw.get("resources") or {}), **store.billing}
    try:
        spec = build_spec(raw)
    except SpecError as error:  # a spec stored by an older moedisco that this one no longer accepts
        return _finish(store, job_id, recorder, "failed", str(error), runner_id=runner_id)
    if runner == "ray":
        prestart_ray_helpers(spec)
    if job.estimate is None:
        record_estimate(store, job_id, spec)
    users = Users(store)

    def should_stop() -> bool:
        return lease.check() or store.is_cancel_requested(job_id)

    state, reason, result = run_to_outcome(spec, runner, recorder, should_stop, runner_id,
                                           lambda: users.budget_left(job.owner), before=lease.renew)
    if state == TAKEN_OVER:  # the job is the other runner's now: it records the outcome
        log.warning("job %s: %s", job_id, reason)
        return None
    if state == "cancelled" and lease.handing_over.is_set() and not store.is_cancel_requested(job_id):
        recorder.sync_costs()  # what this runner's stages cost so far is the job's, wherever it goes on
        log.warning("job %s: handed over to the control plane that dispatches now (%s)", job_id, reason)
        return HANDED_OVER
    return _finish(store, job_id, recorder, state, reason, result, runner_id)


# Not job states: another runner took the job over; this runner gave it up for another cluster to go on with.
TAKEN_OVER, HANDED_OVER = "taken_over", "handed_over"


def run_to_outcome(spec: JobSpec, runner: str, events: Events, should_stop: ShouldStop, runner_id: str,
                   budget_left: BudgetLeft | None = None,
                   before: Callable[[], None] = lambda: None) -> tuple[str, str | None, dict | None]:
    """(state, reason, result): what the runner's return value or exception means for the job; `budget_left`:
    what its owner may still spend this month (`service.store.users.Users.budget_left`), asked before every stage.
    `before()` runs first (the lease's last renewal before the runner claims the job folder: a runner that was
    taken for dead while it prepared must not claim it back)."""
    from moedisco.runner.job_runner import BudgetExceeded
    from moedisco.training.loop import StopRequested

    try:
        before()
        return "succeeded", None, RUNNERS[runner](spec, events, should_stop, runner_id, budget_left)
    except ClaimLost as error:
        return TAKEN_OVER, str(error), None
    except BudgetExceeded as error:
        return "failed", f"budget exceeded: {error}", None
    except StopRequested as error:  # the runner's JobCancelled is one too
        if should_stop():
            return "cancelled", f"cancelled on request: {error}", None
        return "failed", f"stopped: {error}", None
    except Exception as error:
        log.exception("job %s failed", spec.name)
        return "failed", f"{type(error).__name__}: {error}", None


def _finish(store: Store, job_id: str, recorder: EventRecorder, state: str, reason: str | None,
            result: dict | None = None, runner_id: str | None = None) -> str:
    recorder.sync_costs()
    store.finish(job_id, state, reason=reason, result=result, runner_id=runner_id)
    log.info("job %s %s%s", job_id, state, f": {reason}" if reason else "")
    return state


class JobActor:
    """One job's runner. Detached and named after the job, so it outlives the process that started it."""

    def __init__(self, database_url: str, lease_ttl_s: float = 60.0, rules: AccessRules | None = None,
                 billing: dict | None = None):
        self.database_url, self.lease_ttl_s, self.rules, self.billing = database_url, lease_ttl_s, rules, billing
        self.started = False

    def run(self, job_id: str, runner: str) -> str | None:
        import ray

        if self.started:  # a second launch that found this actor alive must not run the job twice
            return None
        self.started = True
        store = Store(self.database_url, billing=self.billing)
        context = ray.get_runtime_context()
        try:
            return execute_job(store, job_id, runner, self.lease_ttl_s, self.rules,
                               ray_session=context.get_session_name(), node=context.get_node_id())
        finally:
            store.close()
            ray.actor.exit_actor()  # free the actor's name and CPU: detached actors otherwise live forever
