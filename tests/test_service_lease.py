"""The runner's lease in the job store, and queueing a failed job again, on SQLite and PostgreSQL alike (the
`store` fixture in tests/conftest.py). No training runs here: runners are replaced by fakes.

    MOEDISCO_TEST_POSTGRES_URL=$(bash service/scripts/start_postgres.sh) pytest tests/test_service_lease.py -q
"""

from __future__ import annotations

from service.jobs import executor
from tests.conftest import make_job


def test_a_lease_is_launched_once_claimed_once_and_renewed_only_by_its_holder(store, tmp_path):
    from datetime import timedelta

    from service.store.models import utcnow

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
