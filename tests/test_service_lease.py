"""The runner's lease in the job store, and queueing a failed job again, on SQLite and PostgreSQL alike (the
`store` fixture in tests/conftest.py), and which control plane dispatches. No training runs here: runners, and the
dispatcher's view of a Ray cluster, are replaced by fakes (tests/test_service_upgrade.py runs the real ones).

    MOEDISCO_TEST_POSTGRES_URL=$(bash service/scripts/start_postgres.sh) pytest tests/test_service_lease.py -q
"""

from __future__ import annotations

import time
from datetime import timedelta

from service.jobs import executor
from service.store.models import DispatchLeaseRow, JobRow, utcnow
from tests.conftest import make_job


def test_a_lease_is_launched_once_claimed_once_and_renewed_only_by_its_holder(store, tmp_path):
    job = make_job(store, tmp_path, "4" * 12)
    store.claim_next_queued()
    an_hour_ago, later = utcnow() - timedelta(hours=1), utcnow() + timedelta(hours=1)
    assert store.begin_attempt(job.id, an_hour_ago)  # the launch reserves the lease ...
    assert not store.begin_attempt(job.id, an_hour_ago)  # ... so a second dispatcher does not launch it again
    assert store.claim_lease(job.id, "a", an_hour_ago) and not store.claim_lease(job.id, "b", an_hour_ago)
    assert store.renew_lease(job.id, "a") and not store.renew_lease(job.id, "b")
    assert store.lease_is_fresh(store.get_job(job.id), an_hour_ago)
    assert not store.lease_is_fresh(store.get_job(job.id), later)  # nobody renewed it since `later`: runner gone
    assert store.begin_attempt(job.id, later) and store.claim_lease(job.id, "b", later)
    assert not store.renew_lease(job.id, "a")  # the old runner learns that it was replaced
    assert store.get_job(job.id).attempts == 2
    assert not store.finish(job.id, "failed", "a stage failed", runner_id="a")  # nor may it end b's job
    assert not store.finish(job.id, "failed", "runner lost", stale_before=an_hour_ago)  # b renewed since
    assert store.finish(job.id, "succeeded", runner_id="b") and store.get_job(job.id).state == "succeeded"


def test_only_a_failed_or_cancelled_job_is_queued_again(store, tmp_path):
    done, failed = make_job(store, tmp_path, "5" * 12), make_job(store, tmp_path, "6" * 12)
    store.claim_next_queued()
    store.claim_next_queued()
    store.finish(done.id, "succeeded")
    store.finish(failed.id, "failed", reason="node lost")
    assert not store.resume_job(done.id) and store.resume_job(failed.id)
    again = store.get_job(failed.id)
    assert (again.state, again.reason, again.attempts, again.finished_at) == ("queued", None, 0, None)


def test_a_second_runner_of_a_job_does_not_run_it(store, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(executor.RUNNERS, "local", lambda *args: calls.append(args) or {"final": "x"})
    monkeypatch.setattr(executor, "record_estimate", lambda *args: None)
    job = make_job(store, tmp_path, "7" * 12)
    store.claim_next_queued()
    assert executor.Lease(store, job.id, ttl_s=60).claim()  # a runner that is alive, elsewhere
    assert executor.execute_job(store, job.id, "local") is None and not calls
    assert store.get_job(job.id).state == "running"


# --- one control plane dispatches; a relaunch after a cluster event is not the job's attempt --------------------------


class Launcher:
    """The dispatcher's view of one Ray cluster (`RayLauncher`'s methods), for one session: which job actors live
    there and how a dead one died. Real Ray runs in tests/test_service_upgrade.py; here only the store's rules."""

    def __init__(self, session: str, node_lost: bool = False):
        self.session, self.node_lost, self.alive, self.launched = session, node_lost, set(), []

    def ray_session(self) -> str:
        return self.session

    def is_alive(self, job_id: str) -> bool:
        return job_id in self.alive

    def node_loss(self, job_id: str) -> str | None:
        return "its node died (drained)" if self.node_lost else None

    def launch(self, job_id: str, runner: str) -> None:
        self.launched.append(job_id)


def dispatcher(store, launcher: Launcher, **settings):
    from service.core.config import Settings
    from service.jobs.dispatcher import Dispatcher

    return Dispatcher(store, launcher, Settings(database_url=store.url, lease_ttl_s=60, **settings))


def test_the_newest_control_plane_dispatches_and_an_older_one_launches_nothing(store, tmp_path):
    old_cluster, new_cluster = Launcher("session_old"), Launcher("session_new")
    old = dispatcher(store, old_cluster)
    first = make_job(store, tmp_path, "a" * 12)
    old.tick()
    assert old_cluster.launched == [first.id] and store.get_job(first.id).ray_session == "session_old"
    new = dispatcher(store, new_cluster)  # an upgrade: the new cluster's control plane starts
    new.tick()
    assert store.dispatch_holder().ray_session == "session_new"
    second = make_job(store, tmp_path, "b" * 12)
    old.tick()  # still alive, but no longer dispatching: it launches nothing, however long it lives
    assert old_cluster.launched == [first.id] and not old.leading
    new.tick()
    assert new_cluster.launched == [second.id]  # the first job's runner still holds its lease: left to it
    # The newer plane gone (its lease stale), the older takes dispatching back.
    with store.session() as session, session.begin():
        session.get(DispatchLeaseRow, "dispatcher").heartbeat_at = utcnow() - timedelta(hours=1)
    assert old.lead() and store.dispatch_holder().holder == old.plane_id


def test_a_restarted_process_of_the_old_cluster_does_not_take_dispatching_back(store, tmp_path):
    """Newer is the newer Ray session first (an upgrade's new cluster), then, within a session, the later process:
    the old cluster's API restarting during the upgrade stands by, and a restart in the new cluster takes over."""
    old_session, new_session = "session_2026-12-07_10-00-00_000000_11", "session_2026-12-07_11-30-00_000000_22"
    new = dispatcher(store, Launcher(new_session))
    assert new.lead()
    restarted_old = dispatcher(store, Launcher(old_session))  # a process started after `new`, in the old cluster
    assert restarted_old.born_at > new.born_at and not restarted_old.lead()
    assert store.dispatch_holder().holder == new.plane_id
    restarted_new = dispatcher(store, Launcher(new_session))
    assert restarted_new.lead() and not new.lead()


def lose_runner(store, job_id: str) -> None:
    """The job's runner stopped renewing its lease an hour ago."""
    with store.session() as session, session.begin():
        session.get(JobRow, job_id).heartbeat_at = utcnow() - timedelta(hours=1)


def test_a_runner_lost_with_its_cluster_or_node_is_relaunched_without_using_up_attempts(store, tmp_path):
    old_cluster = Launcher("session_old")
    job = make_job(store, tmp_path, "c" * 12)
    dispatcher(store, old_cluster, max_attempts=1).tick()
    new_cluster = Launcher("session_new", node_lost=True)
    new = dispatcher(store, new_cluster, max_attempts=1, max_cluster_restarts=2)
    for restarts in (1, 2):  # the old cluster went away; then its node died, in the new one
        lose_runner(store, job.id)
        new.tick()
        assert new_cluster.launched == [job.id] * restarts
        again = store.get_job(job.id)
        assert (again.state, again.attempts, again.cluster_restarts, again.ray_session) == (
            "running", 1, restarts, "session_new")
    lose_runner(store, job.id)
    new.tick()  # a third cluster event: the bound on loops
    failed = store.get_job(job.id)
    assert failed.state == "failed" and "MOEDISCO_MAX_CLUSTER_RESTARTS=2" in failed.reason


def test_a_runner_lost_to_the_job_itself_uses_up_an_attempt(store, tmp_path):
    cluster = Launcher("session_one")  # the runner's own cluster, and its actor crashed (node alive)
    plane = dispatcher(store, cluster, max_attempts=2)
    job = make_job(store, tmp_path, "d" * 12)
    plane.tick()
    lose_runner(store, job.id)
    plane.tick()
    assert (store.get_job(job.id).attempts, store.get_job(job.id).cluster_restarts) == (2, 0)
    lose_runner(store, job.id)
    plane.tick()
    assert store.get_job(job.id).state == "failed" and "MOEDISCO_MAX_ATTEMPTS=2" in store.get_job(job.id).reason


def test_a_runner_hands_its_job_over_at_a_checkpoint_once_another_cluster_dispatches(store, tmp_path, monkeypatch):
    from moedisco.training.loop import StopRequested

    job = make_job(store, tmp_path, "e" * 12)
    old = dispatcher(store, Launcher("session_old"))
    old.tick()
    checkpoints = []

    def trains_until_asked(spec, events, should_stop, runner_id, budget_left=None):
        for step in range(1, 2000):
            if step % 5 == 0:  # a checkpoint: where the training loop polls should_stop
                checkpoints.append(step)
                if should_stop():
                    raise StopRequested(f"stopped at step {step}")
                if step == 10:  # the upgrade's new control plane starts
                    dispatcher(store, Launcher("session_new")).lead()
            time.sleep(0.01)
        raise AssertionError("never asked to stop")

    monkeypatch.setitem(executor.RUNNERS, "local", trains_until_asked)
    monkeypatch.setattr(executor, "record_estimate", lambda *args: None)
    assert executor.execute_job(store, job.id, "local", lease_ttl_s=0.3, ray_session="session_old") is None
    after = store.get_job(job.id)
    assert after.state == "running" and after.runner_id is None and after.heartbeat_at is None  # free at once
    assert [(e.data["state"], e.data["ray_session"]) for e in store.events(job.id, "runner")] == [
        ("started", "session_old"), ("handed_over", "session_old")]
    assert checkpoints[-1] > 10  # went on to a checkpoint after the new plane took over
    new_cluster = Launcher("session_new")
    dispatcher(store, new_cluster).tick()  # the new plane relaunches it at once, not as an attempt
    assert new_cluster.launched == [job.id]
    assert (store.get_job(job.id).attempts, store.get_job(job.id).cluster_restarts) == (1, 1)
