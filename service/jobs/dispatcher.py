"""The queue and the reconciler: starts queued jobs as detached Ray actors, and resumes jobs whose runner is gone.

    dispatcher = Dispatcher(store, RayLauncher(settings), settings)
    dispatcher.tick()      # one pass; `start()` runs passes in a thread every MOEDISCO_DISPATCH_INTERVAL_S

One control plane dispatches at a time: a pass first takes or renews the store's dispatch lease
(`Store.hold_dispatch`), which the newest dispatcher alive holds. During a RayService upgrade the new cluster's
dispatcher takes it as it starts, so the old one stops launching at once, and the old cluster's runners hand their
jobs over at their next checkpoint (`service.jobs.executor.Lease`); the new dispatcher relaunches them on its cluster.

A pass then reconciles: a job marked running whose runner is gone is relaunched on its output_dir, which resumes
it. A runner is gone when no actor of the job is alive in this cluster and nobody renewed the job's lease in the
store for MOEDISCO_LEASE_TTL_S. How it went decides what the relaunch counts against:
- a cluster event (the runner's Ray session is not this one: an upgrade, a head lost without GCS fault tolerance,
  a handover; or its actor died with its node: a drain, a preemption, a lost pod) is not the job's fault, and counts
  in `cluster_restarts`, bounded by MOEDISCO_MAX_CLUSTER_RESTARTS against loops;
- anything else (the runner crashed, was killed for memory or by hand) counts in `attempts`, and a job fails once
  its runner was lost MOEDISCO_MAX_ATTEMPTS times.
Several dispatchers on one store launch a job once: the launch itself is a conditional update of the lease
(`Store.begin_attempt`). Then it starts queued jobs, oldest first, while fewer than MOEDISCO_MAX_RUNNING_JOBS run.
"""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import datetime, timedelta, timezone

from service.core.config import Settings
from service.jobs.executor import JobActor
from service.store.models import utcnow
from service.store.store import Store

log = logging.getLogger(__name__)


def job_actor_placement(runner: str) -> dict:
    """A local-runner actor trains in its own process, so it holds a CPU and goes where one is free; a Ray-runner
    actor only orchestrates, in a driver slot of the on-demand CPU group (`ray_cluster.placement.on_driver_group`),
    off the head, with the trainers' launcher and event queue beside it: a head restart with GCS fault tolerance
    does not end it."""
    if runner == "local":
        return {"num_cpus": 1}
    from ray_cluster.placement import on_driver_group

    return on_driver_group()


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

    @staticmethod
    def ray_session() -> str:
        """This cluster's Ray session: a new cluster has a new one, a head restarted with GCS fault tolerance keeps
        it."""
        import ray

        return ray.get_runtime_context().get_session_name()

    def node_loss(self, job_id: str) -> str | None:
        """How the job's last runner actor in this cluster died, when it died with its node (a drain, a spot
        preemption, a lost pod): a cluster event. None when it died otherwise (a crash, killed for memory or by
        hand) or nothing is known of it: the job's own loss."""
        from ray._private.state import state  # the GCS's actor table: no dashboard needed
        from ray.core.generated.common_pb2 import ActorDiedErrorContext

        try:
            dead = [actor for actor in state.actor_table(None, actor_state_name="DEAD").values()
                    if actor["Name"] == self.actor_name(job_id)]
        except Exception as error:  # the GCS is reachable but the table is not: assume the job's own loss
            log.warning("job %s: could not read how its runner died (%s)", job_id, error)
            return None
        if not dead:
            return None
        cause = max(dead, key=lambda actor: actor["EndTime"])["DeathCause"]
        died = cause.actor_died_error_context
        if cause.HasField("oom_context") or died.reason != ActorDiedErrorContext.NODE_DIED:
            return None
        return f"its node died ({died.node_death_info.reason_message or 'no reason given'})"

    def launch(self, job_id: str, runner: str) -> None:
        import ray

        actor = ray.remote(JobActor).options(
            name=self.actor_name(job_id), namespace=self.settings.ray_namespace, lifetime="detached",
            get_if_exists=True, max_restarts=0, **job_actor_placement(runner),
        ).remote(self.settings.effective_database_url, self.settings.lease_ttl_s, self.settings.access,
                 self.settings.billing())
        actor.run.remote(job_id, runner)  # fire and forget: the actor reports through the store


def session_start(ray_session: str) -> datetime | None:
    """When a Ray session started, from its name (`session_2026-12-07_17-41-29_023999_20940`: Ray names it after its
    head's start, UTC here as in a pod); None for a name of another form."""
    try:
        started = datetime.strptime(ray_session.removeprefix("session_")[:26], "%Y-%m-%d_%H-%M-%S_%f")
    except ValueError:
        return None
    return started.replace(tzinfo=timezone.utc)


class Dispatcher:
    def __init__(self, store: Store, launcher: RayLauncher, settings: Settings):
        self.store, self.launcher, self.settings = store, launcher, settings
        self.plane_id, self.born_at = uuid.uuid4().hex, utcnow()  # which control plane this is, and how new
        self.ray_session: str | None = None  # its cluster's Ray session, once connected, and when that started
        self.session_born_at = self.born_at
        self.leading: bool | None = None
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> None:
        if self.lead():
            self.reconcile()
            self.start_queued()

    def stale_before(self) -> datetime:
        return utcnow() - timedelta(seconds=self.settings.lease_ttl_s)

    def lead(self) -> bool:
        """Take or renew the dispatch lease; False while a newer control plane dispatches (this one stands by)."""
        if self.ray_session is None:
            self.ray_session = self.launcher.ray_session()
            self.session_born_at = session_start(self.ray_session) or self.born_at
        leading = self.store.hold_dispatch(self.plane_id, self.ray_session, self.session_born_at, self.born_at,
                                           self.stale_before())
        if leading != self.leading:
            log.warning("dispatcher %s (Ray session %s) %s", self.plane_id, self.ray_session,
                        "dispatches" if leading else "stands by: a newer control plane dispatches")
            self.leading = leading
        return leading

    def reconcile(self) -> None:
        for job in self.store.jobs_in_state("running"):
            stale_before = self.stale_before()
            if self.launcher.is_alive(job.id) or self.store.lease_is_fresh(job, stale_before):
                continue
            event = self.cluster_event(job)
            # Finished only if nobody renewed the lease in between (a runner starting, another dispatcher).
            if job.cancel_requested:
                self.store.finish(job.id, "cancelled", "cancelled on request (its runner had already stopped)",
                                  stale_before=stale_before)
            elif event is None and job.attempts >= self.settings.max_attempts:
                self.store.finish(job.id, "failed", f"runner lost {job.attempts} times; giving up "
                                                    f"(MOEDISCO_MAX_ATTEMPTS={self.settings.max_attempts})",
                                  stale_before=stale_before)
            elif event is not None and job.cluster_restarts >= self.settings.max_cluster_restarts:
                self.store.finish(job.id, "failed", f"relaunched {job.cluster_restarts} times after cluster events, "
                                                    f"the last: {event} (MOEDISCO_MAX_CLUSTER_RESTARTS="
                                                    f"{self.settings.max_cluster_restarts})",
                                  stale_before=stale_before)
            else:
                log.warning("job %s is running but its runner is gone (%s): resuming it", job.id,
                            event or "lost to the job itself")
                self._launch(job.id, job.runner, counted=event is None)

    def cluster_event(self, job) -> str | None:
        """Why the job's runner is gone, when that was the cluster's doing (see the module's docstring)."""
        if job.ray_session is not None and job.ray_session != self.ray_session:
            return f"its runner's cluster (Ray session {job.ray_session}) went away or handed it over"
        return self.launcher.node_loss(job.id)

    def start_queued(self) -> None:
        while self.store.count_in_state("running") < self.settings.max_running_jobs:
            job = self.store.claim_next_queued()
            if job is None:
                return
            log.info("starting job %s (%s)", job.id, job.name)
            self._launch(job.id, job.runner)

    def _launch(self, job_id: str, runner: str, counted: bool = True) -> None:
        # Else another dispatcher just launched it.
        if self.store.begin_attempt(job_id, self.stale_before(), ray_session=self.ray_session, counted=counted):
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
