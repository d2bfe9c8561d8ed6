"""The queue and the reconciler: starts queued jobs as detached Ray actors, and resumes jobs whose runner is gone.

    dispatcher = Dispatcher(store, RayLauncher(settings), settings)
    dispatcher.tick()      # one pass; `start()` runs passes in a thread every MOEDISCO_DISPATCH_INTERVAL_S

A pass first reconciles: a job marked running whose runner is gone (the API and the cluster restarted, the actor's
node died) is relaunched on its output_dir, which resumes it; after MOEDISCO_MAX_ATTEMPTS starts it fails. A runner
is gone when no actor of the job is alive in this cluster and nobody renewed the job's lease in the store for
MOEDISCO_LEASE_TTL_S: during a RayService upgrade the old cluster's runner keeps its lease, so the new cluster's
dispatcher leaves the job to it, and takes it over once that runner has stopped. Several dispatchers on one store
launch a job once: the launch itself is a conditional update of the lease (`Store.begin_attempt`).
Then it starts queued jobs, oldest first, while fewer than MOEDISCO_MAX_RUNNING_JOBS run.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from service.core.config import Settings
from service.jobs.executor import JobActor
from service.store.models import utcnow
from service.store.store import Store

log = logging.getLogger(__name__)


def job_actor_placement(runner: str) -> dict:
    """A local-runner actor trains in its own process, so it holds a CPU and goes where one is free; a Ray-runner
    actor only orchestrates, on the head (`ray_cluster.placement.on_control_plane`), with the trainers' launcher
    and event queue beside it."""
    if runner == "local":
        return {"num_cpus": 1}
    from ray_cluster.placement import on_control_plane

    return on_control_plane()


class RayLauncher:
    """Starts and finds job actors: detached, named `job-<id>` in the service's Ray namespace."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def ensure_ray(self) -> None:
        """Inside a Serve replica Ray is already up; uvicorn mode joins a cluster, sending Ray's token where the
        environment gives one (RAY_AUTH_MODE=token; a refusal raises ray_cluster.auth.RayAuthError, which says so)."""
        import ray

        if not ray.is_initialized():
            from ray_cluster.auth import connect
            from ray_cluster.local_cluster import wants_token

            address = self.settings.ray_address
            connect(address, token_expected=wants_token(address), namespace=self.settings.ray_namespace)

    @staticmethod
    def actor_name(job_id: str) -> str:
        return f"job-{job_id}"

    def is_alive(self, job_id: str) -> bool:
        import ray

        try:
            ray.get_actor(self.actor_name(job_id), namespace=self.settings.ray_namespace)
        except ValueError:  # no live actor of that name: never started, exited, or died
            return False
        return True

    def launch(self, job_id: str, runner: str) -> None:
        import ray

        actor = ray.remote(JobActor).options(
            name=self.actor_name(job_id), namespace=self.settings.ray_namespace, lifetime="detached",
            get_if_exists=True, max_restarts=0, **job_actor_placement(runner),
        ).remote(self.settings.effective_database_url, self.settings.lease_ttl_s, self.settings.access,
                 self.settings.billing())
        actor.run.remote(job_id, runner)  # fire and forget: the actor reports through the store


class Dispatcher:
    def __init__(self, store: Store, launcher: RayLauncher, settings: Settings):
        self.store, self.launcher, self.settings = store, launcher, settings
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> None:
        self.reconcile()
        self.start_queued()

    def stale_before(self) -> datetime:
        return utcnow() - timedelta(seconds=self.settings.lease_ttl_s)

    def reconcile(self) -> None:
        for job in self.store.jobs_in_state("running"):
            stale_before = self.stale_before()
            if self.launcher.is_alive(job.id) or self.store.lease_is_fresh(job, stale_before):
                continue
            # Finished only if nobody renewed the lease in between (a runner starting, another dispatcher).
            if job.cancel_requested:
                self.store.finish(job.id, "cancelled", "cancelled on request (its runner had already stopped)",
                                  stale_before=stale_before)
            elif job.attempts >= self.settings.max_attempts:
                self.store.finish(job.id, "failed", f"runner lost {job.attempts} times; giving up "
                                                    f"(MOEDISCO_MAX_ATTEMPTS={self.settings.max_attempts})",
                                  stale_before=stale_before)
            else:
                log.warning("job %s is running but its runner is gone: resuming it (attempt %d)",
                            job.id, job.attempts + 1)
                self._launch(job.id, job.runner)

    def start_queued(self) -> None:
        while self.store.count_in_state("running") < self.settings.max_running_jobs:
            job = self.store.claim_next_queued()
            if job is None:
                return
            log.info("starting job %s (%s)", job.id, job.name)
            self._launch(job.id, job.runner)

    def _launch(self, job_id: str, runner: str) -> None:
        if self.store.begin_attempt(job_id, self.stale_before()):  # else another dispatcher just launched it
            self.launcher.launch(job_id, runner)

    # --- background thread --------------------------------------------------------------------------------------

    def wake(self) -> None:
        """Run a pass now (a job was just submitted) instead of at the next interval."""
        self._wake.set()

    def start(self) -> None:
        self.launcher.ensure_ray()
        self._thread = threading.Thread(target=self._loop, name="moedisco-dispatcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a database or Ray hiccup must not end the queue for good
                log.exception("dispatcher pass failed; retrying")
            self._wake.wait(self.settings.dispatch_interval_s)
            self._wake.clear()
