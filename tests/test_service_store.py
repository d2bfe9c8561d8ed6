"""The job store, the event recorder and the executor's outcomes, on SQLite and on PostgreSQL alike.

PostgreSQL runs where MOEDISCO_TEST_POSTGRES_URL names a database (the `store` fixture in tests/conftest.py);
elsewhere those cases skip. Runners are replaced by fakes that emit the events moedisco's runners emit, so no
training runs here. The runner's lease: tests/test_service_lease.py; users and budgets: test_service_budgets.py.

    MOEDISCO_TEST_POSTGRES_URL=$(bash service/scripts/start_postgres.sh) pytest tests/test_service_store.py -q
"""

from __future__ import annotations

import json
import threading

import pytest

from moedisco.job.events import StageSkipped, parse_event
from moedisco.runner.job_runner import BudgetExceeded
from moedisco.training.loop import StopRequested
from service.jobs import executor
from service.jobs.recorder import EventRecorder
from service.reporting.costs import job_cost
from service.store.store import Store
from tests.conftest import make_job, tiny_spec_dict


def test_list_filters_and_pages_newest_first(store, tmp_path):
    ids = [f"{i:012x}" for i in range(5)]
    for job_id in ids:
        make_job(store, tmp_path, job_id, name=f"job-{job_id}")
    store.claim_next_queued()
    rows, count = store.list_jobs(None, offset=1, limit=2)
    assert count == 5 and [r.id for r in rows] == ids[::-1][1:3]
    rows, count = store.list_jobs(["running"], 0, 10)
    assert count == 1 and rows[0].id == ids[0] and rows[0].started_at is not None
    assert store.list_jobs(["queued", "succeeded"], 0, 10)[1] == 4
    assert store.count_by_owner_and_state() == {("admin", "queued"): 4, ("admin", "running"): 1}


def test_concurrent_claims_start_each_job_once(store, tmp_path):
    ids = [f"{i:012x}" for i in range(12)]
    for job_id in ids:
        make_job(store, tmp_path, job_id)
    claimed: list[str] = []

    def claim_all() -> None:
        while (job := store.claim_next_queued()) is not None:
            claimed.append(job.id)

    threads = [threading.Thread(target=claim_all) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(claimed) == ids


def test_terminal_state_is_final_and_cancel_depends_on_state(store, tmp_path):
    make_job(store, tmp_path, "a" * 12)
    make_job(store, tmp_path, "b" * 12)
    assert store.request_cancel("a" * 12).state == "cancelled"
    running = store.claim_next_queued()
    after = store.request_cancel(running.id)
    assert after.state == "running" and after.cancel_requested and store.is_cancel_requested(running.id)
    assert store.finish(running.id, "cancelled", "asked")
    assert not store.finish(running.id, "succeeded")
    assert store.get_job(running.id).state == "cancelled" and store.get_job(running.id).reason == "asked"


def test_recorder_folds_events_into_stages_and_costs(store, tmp_path):
    job = make_job(store, tmp_path, "c" * 12)
    output = tmp_path / "out"
    output.mkdir()
    record = EventRecorder(store, job.id, output)
    record(parse_event({"event": "stage_started", "stage": "submodel", "expert": 1}))
    record(parse_event({"event": "expert_state", "stage": "submodel", "expert": 1, "state": "running"}))
    record(parse_event({"event": "progress", "stage": "submodel", "expert": 1, "step": 4, "total_steps": 12,
                        "loss": 5.0, "eval_loss": 5.5}))
    record(parse_event({"event": "progress", "stage": "submodel", "expert": 1, "step": 8, "total_steps": 12,
                        "loss": float("nan"), "eval_loss": float("inf")}))
    stage = store.stages(job.id)[0]
    assert (stage.state, stage.step, stage.loss, stage.eval_loss, stage.runner_state) == (
        "running", 8, 5.0, 5.5, "running")
    ledger = {"stages": [{"stage": "submodel", "expert": 1, "tier": "4090", "device_type": "rtx4090",
                          "num_devices": 1, "seconds": 36.0, "device_hours": 0.01, "price_per_hour": 0.35,
                          "usd": 0.0035, "simulated": True, "device": "cpu", "node": None}]}
    (output / "cost.json").write_text(json.dumps(ledger))
    record(parse_event({"event": "stage_finished", "stage": "submodel", "expert": 1,
                        "summary": {"seconds": 36.0, "eval_loss": 4.9}}))
    record(parse_event({"event": "stage_skipped", "stage": "submodel", "expert": 1}))
    stage = store.stages(job.id)[0]
    assert (stage.state, stage.seconds, stage.eval_loss) == ("finished", 36.0, 4.9)
    assert store.get_job(job.id).current_stage == "submodel/1"
    (cost,) = store.cost_rows(job.id)
    assert (cost.tier, cost.usd, cost.expert) == ("4090", 0.0035, 1)
    assert store.usd_by_owner_and_tier() == {("admin", "4090"): 0.0035}
    assert [e.event for e in store.events(job.id)][-2:] == ["stage_finished", "stage_skipped"]
    assert store.finished_stage_seconds() == [("submodel", 36.0)]


def test_a_finished_sync_round_is_not_a_finished_stage(store, tmp_path):
    from moedisco.config.loading import build_spec

    full = build_spec(tiny_spec_dict(tmp_path / "r")).model_dump(mode="json")  # stored in full, as the API does
    job = store.create_job("r" * 12, full, runner="local")
    store.claim_next_queued()
    record = EventRecorder(store, job.id, tmp_path)
    record(parse_event({"event": "stage_started", "stage": "submodel", "expert": 0, "round": 0}))
    record(parse_event({"event": "stage_finished", "stage": "submodel", "expert": 0, "round": 0, "final": False,
                        "summary": {"steps": 25, "total_steps": 100, "seconds": 9.0}}))
    stage = store.stages(job.id)[0]
    assert (stage.state, stage.step, stage.finished_at) == ("between_rounds", 25, None)
    assert store.finished_stage_seconds() == []
    record(parse_event({"event": "stage_started", "stage": "submodel", "expert": 0, "round": 1}))
    ledger = {"stages": [{"stage": "submodel", "expert": 0, "tier": "4090", "device_type": "rtx4090",
                          "num_devices": 1, "seconds": 9.0, "device_hours": 0.0025, "price_per_hour": 0.35,
                          "usd": 0.000875, "simulated": True, "device": "cpu", "node": None}]}
    (tmp_path / "cost.json").write_text(json.dumps(ledger))
    record.sync_costs()
    # Round 1 runs: round 0's priced row is not final, and round 1 is priced by its time so far.
    rows = job_cost(store, store.get_job(job.id)).stages
    assert [(row.stage, row.expert, row.final) for row in rows] == [("submodel", 0, False)] * 2
    assert rows[0].usd + rows[1].usd > 0.000875
    record(parse_event({"event": "stage_finished", "stage": "submodel", "expert": 0, "round": 1,
                        "summary": {"steps": 100, "total_steps": 100, "seconds": 27.0}}))
    stage = store.stages(job.id)[0]
    assert stage.state == "finished" and stage.seconds == 36.0  # both rounds


def test_a_measured_baseline_must_match_data_and_model(store, tmp_path):
    moe = make_job(store, tmp_path, "d" * 12, seed=1)
    other = make_job(store, tmp_path, "e" * 12, method="full_parameter", seed=2)
    same = make_job(store, tmp_path, "f" * 12, method="full_parameter", seed=1)
    for job in (other, same):
        store.claim_next_queued()
    for job in (moe, other, same):
        store.finish(job.id, "succeeded")
    assert store.find_baseline(store.get_job(moe.id))[0].id == same.id
    assert store.find_baseline(store.get_job(same.id)) is None
    others = make_job(store, tmp_path, "a" * 12, owner="bob", seed=1)  # another user's job on the same data
    assert store.find_baseline(store.get_job(others.id)) is None  # the admin's baseline is not bob's to see


def fake_runner(outcome):
    """A runner that starts a stage, logs a step, then ends with `outcome` (an exception, or a summary)."""
    def run(spec, events, should_stop, owner, budget_left=None):
        events(parse_event({"event": "stage_started", "stage": "finetune", "expert": None}))
        events(parse_event({"event": "progress", "stage": "finetune", "expert": None, "step": 1, "total_steps": 2,
                            "loss": 1.0, "eval_loss": None}))
        if isinstance(outcome, Exception):
            raise outcome
        return outcome
    return run


@pytest.mark.parametrize(("outcome", "cancel", "state", "reason"), [
    ({"final": "x"}, False, "succeeded", None),
    (BudgetExceeded("stopped before stage 'merge': $1 spent of the $0.5 budget (max_cost_usd)"), False, "failed",
     "budget exceeded: stopped before stage 'merge'"),
    (StopRequested("finetune stopped at step 1"), True, "cancelled", "cancelled on request"),
    (RuntimeError("CUDA out of memory"), False, "failed", "RuntimeError: CUDA out of memory"),
])
def test_executor_turns_runner_outcomes_into_states(store, tmp_path, monkeypatch, outcome, cancel, state, reason):
    monkeypatch.setitem(executor.RUNNERS, "local", fake_runner(outcome))
    monkeypatch.setattr(executor, "record_estimate", lambda *args: None)
    job = make_job(store, tmp_path, "1" * 12)
    store.claim_next_queued()
    if cancel:
        store.request_cancel(job.id)
    assert executor.execute_job(store, job.id, "local") == state
    done = store.get_job(job.id)
    assert done.state == state and done.finished_at is not None
    assert (done.reason or "").startswith(reason or "") and (reason is None) == (done.reason is None)
    assert store.stages(job.id)[0].state == {"succeeded": "running", "failed": "failed",
                                             "cancelled": "stopped"}[state]
    assert executor.execute_job(store, job.id, "local") is None  # a finished job is never run again


def test_cancel_before_a_stage_stops_the_local_runner(store, tmp_path, monkeypatch):
    """The real runner: it polls the cancel flag before every stage, not only inside training loops."""
    monkeypatch.setattr(executor, "record_estimate", lambda *args: None)
    job = make_job(store, tmp_path, "2" * 12)
    store.claim_next_queued()
    store.request_cancel(job.id)
    assert executor.execute_job(store, job.id, "local") == "cancelled"
    assert "before stage 'prepare'" in store.get_job(job.id).reason
    assert [e.event for e in store.events(job.id)] == ["runner", "job_cancelled", "runner"]  # started, ended


def test_every_write_to_a_job_bumps_its_version(store, tmp_path):
    """The API's read cache trusts the version: a write that changes what a view shows without bumping it would
    leave clients looking at an old job."""
    job = make_job(store, tmp_path, "3" * 12)
    other = make_job(store, tmp_path, "4" * 12)
    output = tmp_path / "out3"
    output.mkdir()
    record = EventRecorder(store, job.id, output)
    versions = [store.job_version(job.id)]

    def changed(what: str) -> None:
        versions.append(store.job_version(job.id))
        assert versions[-1] > versions[-2], f"{what} did not bump the version"

    store.claim_next_queued()
    changed("claim")
    store.begin_attempt(job.id)
    changed("begin_attempt")
    store.set_estimate(job.id, {"total_usd": 1.0})
    changed("set_estimate")
    record(parse_event({"event": "stage_started", "stage": "submodel", "expert": 0}))
    changed("stage_started")
    record(parse_event({"event": "progress", "stage": "submodel", "expert": 0, "step": 4, "total_steps": 12,
                        "loss": 5.0}))
    changed("progress")
    record(parse_event({"event": "expert_state", "stage": "submodel", "expert": 0, "state": "running"}))
    changed("expert_state")
    (output / "cost.json").write_text(json.dumps({"stages": [{"stage": "submodel", "expert": 0, "tier": "4090",
                                                              "device_type": "rtx4090", "num_devices": 1,
                                                              "seconds": 1.0, "device_hours": 0.0003,
                                                              "price_per_hour": 0.35, "usd": 0.0001,
                                                              "simulated": True, "device": "cpu", "node": None}]}))
    record.sync_costs()
    changed("sync_costs")
    store.request_cancel(job.id)
    changed("request_cancel")
    before_finish = versions[-1]
    assert store.finish(job.id, "cancelled", "asked")
    changed("finish")
    assert versions[-1] >= before_finish + 2, "closing the running stages is a write of its own"
    assert store.stages(job.id)[0].state == "stopped"
    assert not store.finish(job.id, "failed")  # no change, no bump
    assert store.job_version(job.id) == versions[-1]
    assert store.job_version(other.id) == 0 and store.job_version("no-such-job") is None


def test_view_versions_change_when_a_possible_baseline_does(store, tmp_path):
    moe = make_job(store, tmp_path, "5" * 12)
    baseline = make_job(store, tmp_path, "6" * 12, method="full_parameter")
    first = store.view_versions(moe.id)
    store.claim_next_queued()  # the MoE job: its own version moves
    assert store.view_versions(moe.id)[0] > first[0]
    second = store.view_versions(moe.id)
    store.claim_next_queued()  # a running full-parameter job is no baseline yet
    assert store.view_versions(moe.id) == second
    store.finish(baseline.id, "succeeded")
    third = store.view_versions(moe.id)
    assert third[0] == second[0] and third[1:] != second[1:]
    EventRecorder(store, baseline.id, tmp_path)(StageSkipped(stage="full_parameter"))
    assert store.view_versions(moe.id)[1:] != third[1:]  # a write to the baseline job
    assert store.view_versions("no-such-job") is None


def test_a_store_from_before_versions_gets_the_column(tmp_path):
    """`create_all` never alters a table: a database created without `version` gets it, every job at 0."""
    from sqlalchemy import create_engine, inspect, text

    url = f"sqlite:///{tmp_path / 'old.db'}"
    first = Store(url)
    make_job(first, tmp_path, "7" * 12)
    first.close()
    engine = create_engine(url)
    with engine.begin() as connection:  # the table as an older moedisco created it, with a job in it
        connection.execute(text("ALTER TABLE moedisco_jobs DROP COLUMN version"))
    assert "version" not in {c["name"] for c in inspect(engine).get_columns("moedisco_jobs")}
    engine.dispose()
    for _ in range(2):  # a second start finds the column and leaves it
        store = Store(url)
        assert store.job_version("7" * 12) == 0
        store.close()
    store = Store(url)
    store.claim_next_queued()
    assert store.job_version("7" * 12) == 1
    store.close()


def test_a_job_stored_before_sync_rounds_resumes_as_one_round(store, tmp_path, monkeypatch):
    """The service stores a job's full spec at submission; one stored by an older version lacks later fields."""
    from moedisco.config.loading import build_spec
    from moedisco.job.layout import JobPaths
    from moedisco.runner.job_runner import check_same_job

    def resume(spec, events, should_stop, owner, budget_left=None):
        check_same_job(spec, JobPaths(spec.output_dir))  # what a real runner does first
        return {"sync_rounds": spec.branch.sync_rounds}

    monkeypatch.setitem(executor.RUNNERS, "local", resume)
    monkeypatch.setattr(executor, "record_estimate", lambda *args: None)
    full = build_spec(tiny_spec_dict(tmp_path / "old")).model_dump(mode="json")
    del full["branch"]["sync_rounds"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "spec.yaml").write_text(json.dumps(full))  # the older runner saved it too (JSON is YAML)
    job = store.create_job("0" * 12, full, runner="local")
    store.claim_next_queued()
    assert executor.execute_job(store, job.id, "local") == "succeeded", store.get_job(job.id).reason
    assert store.get_job(job.id).result == {"sync_rounds": 1}


