"""Runs one job and writes everything it does into the store; `JobActor` is that, as a detached Ray actor.

    execute_job(Store(url), job_id, runner="local")          # in any process: what the actor does
    ray.remote(JobActor).options(name=..., lifetime="detached").remote(url).run.remote(job_id, "ray")

The actor talks to the store directly, not to the API, so a job keeps running and recording while the API
process (a Serve replica, a uvicorn process) is restarted. Re-running a job on its output_dir resumes it: finished
stages are skipped and an interrupted training stage continues from its last checkpoint, which is what makes
relaunching a lost runner safe.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from moedisco.config import JobSpec, SpecError, build_spec, upgrade_saved_spec
from moedisco.events import Events
from service.recorder import EventRecorder
from service.store import Store

log = logging.getLogger(__name__)

ShouldStop = Callable[[], bool]


def _run_local(spec: JobSpec, events: Events, should_stop: ShouldStop) -> dict:
    from moedisco.runner import run_job

    return run_job(spec, events=events, progress=False, should_stop=should_stop)


def _run_ray(spec: JobSpec, events: Events, should_stop: ShouldStop) -> dict:
    from ray_cluster.orchestrate import run_job_on_ray  # written in parallel: import only when used

    return run_job_on_ray(spec, progress=False, events=events, should_stop=should_stop)


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
        from moedisco.estimate import estimate_job

        store.set_estimate(job_id, estimate_job(spec)["cost"])
    except Exception as error:  # an estimate is a nicety; the job runs without it
        log.warning("job %s: no cost estimate (%s)", job_id, error)


def execute_job(store: Store, job_id: str, runner: str) -> str | None:
    """Run a `running` job to a terminal state; returns that state (None when the job was not running)."""
    job = store.get_job(job_id)
    if job is None or job.state != "running":
        return None
    recorder = EventRecorder(store, job_id, job.output_dir)
    try:
        spec = build_spec(upgrade_saved_spec(job.spec))  # stored in full when submitted, perhaps by an older version
    except SpecError as error:  # a spec stored by an older moedisco that this one no longer accepts
        return _finish(store, job_id, recorder, "failed", str(error))
    if runner == "ray":
        prestart_ray_helpers(spec)
    if job.estimate is None:
        record_estimate(store, job_id, spec)
    state, reason, result = run_to_outcome(spec, runner, recorder, lambda: store.is_cancel_requested(job_id))
    return _finish(store, job_id, recorder, state, reason, result)


def run_to_outcome(spec: JobSpec, runner: str, events: Events,
                   should_stop: ShouldStop) -> tuple[str, str | None, dict | None]:
    """(state, reason, result): what the runner's return value or exception means for the job."""
    from moedisco.runner import BudgetExceeded
    from moedisco.train import StopRequested

    try:
        return "succeeded", None, RUNNERS[runner](spec, events, should_stop)
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
            result: dict | None = None) -> str:
    recorder.sync_costs()
    store.finish(job_id, state, reason=reason, result=result)
    log.info("job %s %s%s", job_id, state, f": {reason}" if reason else "")
    return state


class JobActor:
    """One job's runner. Detached and named after the job, so it outlives the process that started it."""

    def __init__(self, database_url: str):
        self.database_url = database_url
        self.started = False

    def run(self, job_id: str, runner: str) -> str | None:
        import ray

        if self.started:  # a second launch that found this actor alive must not run the job twice
            return None
        self.started = True
        store = Store(self.database_url)
        try:
            return execute_job(store, job_id, runner)
        finally:
            store.close()
            ray.actor.exit_actor()  # free the actor's name and CPU: detached actors otherwise live forever
