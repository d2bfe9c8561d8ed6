"""The billed cost in the service: node uses recorded from the runner's events, nodes from its ledger, each job
billed its share of the nodes it shared with other users' jobs, budgets counting the bill, and the operator's
prices (not the user's) applied at submission. On SQLite and PostgreSQL alike (the `store` fixture)."""

from __future__ import annotations

import json
import time

import pytest
import yaml
from fastapi.testclient import TestClient

from moedisco.job.events import NodeUse
from moedisco.planning.billing import NodeLife, attribute
from service.core.config import Settings
from service.jobs.recorder import EventRecorder
from service.main import create_app
from service.reporting.costs import job_cost
from service.store.billing import bill_inputs
from service.store.models import utcnow
from service.store.users import Users
from tests.conftest import CORPUS, make_job, tiny_spec_dict

T0 = time.time() - 3600  # an hour ago: every node and use has ended, so the bill no longer moves


def _ledger(tmp_path, job_id: str, nodes: list[NodeLife], compute_usd: float) -> EventRecorder:
    """The job's runner ledger (cost.json) with one compute row and the nodes it saw, synced by the recorder."""
    output = tmp_path / f"out-{job_id}"
    output.mkdir(exist_ok=True)
    (output / "cost.json").write_text(json.dumps({"stages": [
        {"stage": "submodel", "expert": 0, "tier": "4090", "device_type": "rtx4090", "num_devices": 1,
         "seconds": 60.0, "device_hours": 1 / 60, "price_per_hour": 0.35, "usd": compute_usd, "simulated": True,
         "device": "cpu", "node": None}],
        "usage": {"nodes": [vars(node) for node in nodes], "uses": [{"node": node.node} for node in nodes]}}))
    return EventRecorder(store=None, job_id=job_id, output_dir=output)


def _record(store, tmp_path, job_id: str, uses: list[tuple[float, float | None, dict]], nodes: list[NodeLife],
            compute_usd: float = 0.01) -> None:
    recorder = _ledger(tmp_path, job_id, nodes, compute_usd)
    recorder.store = store
    for pid, (start, end, resources) in enumerate(uses):
        recorder(NodeUse(stage="submodel", expert=0, round=0, node="n1", pid=pid, start=start, resources=resources))
        if end is not None:  # opened as the work starts, closed as it ends: one row
            recorder(NodeUse(stage="submodel", expert=0, round=0, node="n1", pid=pid, start=start, end=end,
                             resources=resources))
    recorder.sync_costs()


NODE = NodeLife(node="n1", group="cheap-4090", requested_at=T0 - 60, started_at=T0 - 30, ended_at=T0 + 900,
                resources={"CPU": 2.0, "GPU": 1.0}, simulated=True)


def _shared(store, tmp_path):
    """ada's job and bob's job on one cheap node: ada's launched it (boot), both used it, bob's used it last."""
    ada = make_job(store, tmp_path, "a" * 12, "ada")
    bob = make_job(store, tmp_path, "b" * 12, "bob")
    for job, started in ((ada, T0 - 120), (bob, T0 + 100)):
        store.claim_next_queued()
        store._update_job(job.id, [], started_at=utcnow().fromtimestamp(started, tz=utcnow().tzinfo))
    _record(store, tmp_path, ada.id, [(T0, T0 + 300, {"GPU": 1.0})], [NODE])
    _record(store, tmp_path, bob.id, [(T0 + 200, T0 + 500, {"CPU": 1.0})], [NODE])
    return store.get_job(ada.id), store.get_job(bob.id)


def test_jobs_sharing_a_node_are_each_billed_their_part_and_nothing_twice(store, tmp_path):
    ada, bob = _shared(store, tmp_path)
    ada_view, bob_view = job_cost(store, ada), job_cost(store, bob)
    # ada: boot 60 s, alone 200 s, then 2:1 with bob's half-CPU share for 100 s. bob: 100/3 s, alone 200 s, then
    # the node's idle timeout (120 s) before it was gone; the rest was kept by nobody.
    assert ada_view.billed.basis == "nodes" and bob_view.billed.basis == "nodes"
    assert ada_view.billed.seconds_by_kind["boot"] == pytest.approx(60.0)
    assert ada_view.billed.seconds == pytest.approx(60 + 200 + 100 * 2 / 3)
    assert bob_view.billed.seconds == pytest.approx(100 / 3 + 200 + 120)
    assert bob_view.billed.seconds_by_kind["idle"] == pytest.approx(120.0)
    # What both are billed plus what nobody is adds up to the node's life, from its request to its end.
    inputs = bill_inputs(store, ada)
    bill = attribute(inputs.lives, inputs.uses, inputs.resources, time.time(), job_starts=inputs.job_starts)
    assert bill.seconds(ada.id) + bill.seconds(bob.id) + bill.seconds(None) == pytest.approx(960.0)
    assert ada_view.billed_usd == pytest.approx(ada_view.billed.seconds / 3600 * 0.35)  # cheap-4090's price
    assert ada_view.billed.simulated and ada_view.total_usd == pytest.approx(0.01)  # the compute view beside it
    assert bob.id not in json.dumps(ada_view.model_dump())  # ada's view names no other job


def test_budgets_count_the_billed_dollars(store, tmp_path):
    users = Users(store)
    users.create_user("ada", monthly_budget_usd=1.0)
    ada, _ = _shared(store, tmp_path)
    billed = job_cost(store, ada).billed_usd
    assert billed > 0.01  # more than its compute row: boot and waits are billed
    assert users.month_spend("ada") == pytest.approx(billed)
    assert users.budget_left("ada") == pytest.approx(1.0 - billed)


def test_an_open_use_bills_up_to_now_and_the_view_is_live(store, tmp_path):
    job = make_job(store, tmp_path, "c" * 12, "ada")
    store.claim_next_queued()
    now = time.time()
    alive = NodeLife(node="n1", group="cheap-4090-spot", started_at=now - 100, resources={"GPU": 1.0})
    _record(store, tmp_path, job.id, [(now - 100, None, {"GPU": 1.0})], [alive])
    first = job_cost(store, store.get_job(job.id))
    time.sleep(0.2)
    second = job_cost(store, store.get_job(job.id))
    assert second.billed.seconds > first.billed.seconds >= 100.0
    assert first.billed.rows[0].group == "cheap-4090-spot"
    assert first.billed_usd == pytest.approx(first.billed.seconds / 3600 * 0.20)  # the spot group's price


def test_the_operators_prices_replace_the_users_and_prometheus_shows_both_views(tmp_path):
    prices = tmp_path / "prices.yaml"
    prices.write_text(yaml.safe_dump({"prices": {"a100": 3.0},
                                      "node_groups": {"cheap-4090-spot": {"price_per_hour": 0.12}}}))
    # database_url explicitly: a MOEDISCO_DATABASE_URL in the developer's shell must never receive test jobs.
    settings = Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'moedisco.db'}",
                        runner="local", api_token="t", input_roots=[CORPUS.parent], prices_file=prices)
    with TestClient(create_app(settings, dispatch=False)) as client:
        spec = tiny_spec_dict(tmp_path / "job", resources={"prices": {"rtx4090": 0.0, "a100": 0.0, "cpu": 0.0},
                                                           "idle_timeout_s": 0})
        created = client.post("/v1/jobs", json=spec, headers={"Authorization": "Bearer t"})
        assert created.status_code == 201, created.text
        stored = client.get(f"/v1/jobs/{created.json()['id']}", headers={"Authorization": "Bearer t"}).json()
        resources = stored["spec"]["resources"]
        assert resources["prices"] == {"rtx4090": 0.35, "a100": 3.0, "cpu": 0.181}
        assert resources["idle_timeout_s"] == 120.0
        assert resources["node_groups"]["cheap-4090-spot"]["price_per_hour"] == 0.12
        metrics = client.get("/metrics", headers={"Authorization": "Bearer t"}).text
        assert "moedisco_billed_usd" in metrics and "moedisco_spent_usd" in metrics


def test_a_bad_prices_file_stops_the_service_naming_it(tmp_path):
    bad = tmp_path / "prices.yaml"
    bad.write_text(yaml.safe_dump({"prices": {"a100": 1.0}, "label_key": "x"}))
    with pytest.raises(ValueError, match="only prices, node_groups, price_changes, idle_timeout_s may be set"):
        Settings(data_dir=tmp_path, prices_file=bad)


def test_a_use_its_runner_never_closed_ends_where_the_job_did(store, tmp_path):
    """A runner that died holding a node: its open use is closed at the job's end, not billed for ever."""
    job = make_job(store, tmp_path, "d" * 12, "ada")
    store.claim_next_queued()
    alive = NodeLife(node="n1", group="cheap-4090", started_at=T0 - 30, resources={"GPU": 1.0})
    _record(store, tmp_path, job.id, [(T0, None, {"GPU": 1.0})], [alive])
    store.finish(job.id, "failed", "runner lost")
    finished = store.get_job(job.id)
    view = job_cost(store, finished)
    assert view.billed.seconds_by_kind["busy"] == pytest.approx(finished.finished_at.timestamp() - T0, abs=1.0)
    time.sleep(0.3)
    assert job_cost(store, finished).billed.seconds_by_kind["busy"] == view.billed.seconds_by_kind["busy"]
    assert job_cost(store, finished).billed_usd == pytest.approx(Users(store).month_spend("ada"), rel=1e-3)


def test_a_lost_runners_use_ends_where_the_next_runner_was_launched(store, tmp_path):
    """A running job relaunched after its runner was lost (here after a cluster event): the lost runner's open use
    (its driver slot, a trainer's node) ends at the relaunch, not when the job does."""
    job = make_job(store, tmp_path, "h" * 12, "ada")
    store.claim_next_queued()
    assert store.begin_attempt(job.id, ray_session="session_old")
    opened = time.time()  # by the first runner, after its launch
    alive = NodeLife(node="n1", group="cheap-4090", started_at=T0 - 30, resources={"GPU": 1.0})
    _record(store, tmp_path, job.id, [(opened, None, {"GPU": 1.0})], [alive])
    time.sleep(1.0)
    assert store.begin_attempt(job.id, counted=False, ray_session="session_new")
    relaunched = store.get_job(job.id)
    busy = job_cost(store, relaunched).billed.seconds_by_kind["busy"]
    assert busy == pytest.approx(relaunched.launched_at.timestamp() - opened, abs=0.2)
    time.sleep(0.3)
    assert job_cost(store, store.get_job(job.id)).billed.seconds_by_kind["busy"] == busy  # no longer growing


def test_runners_views_of_a_node_merge_and_a_node_not_yet_reported_falls_back_to_compute(store, tmp_path):
    ada = make_job(store, tmp_path, "e" * 12, "ada")
    store.claim_next_queued()
    _record(store, tmp_path, ada.id, [(T0, T0 + 60, {"GPU": 1.0})], [NODE])
    thinner = NodeLife(node="n1", group="cheap-4090", started_at=T0 - 30, ended_at=None, resources={"GPU": 1.0})
    _record(store, tmp_path, ada.id, [], [thinner])  # another runner saw it later, without its request or end
    lives = bill_inputs(store, store.get_job(ada.id)).lives
    assert [(life.requested_at, life.ended_at) for life in lives] == [(NODE.requested_at, NODE.ended_at)]
    bob = make_job(store, tmp_path, "f" * 12, "bob")
    store.claim_next_queued()
    recorder = _ledger(tmp_path, bob.id, [], compute_usd=0.5)
    recorder.store = store
    recorder(NodeUse(stage="submodel", expert=0, node="unreported", pid=1, start=T0, end=T0 + 60))
    recorder.sync_costs()
    view = job_cost(store, store.get_job(bob.id))
    assert view.billed.basis == "compute" and view.billed_usd == pytest.approx(0.5)
    assert Users(store).month_spend("bob") == pytest.approx(0.5)


def test_the_operators_prices_apply_to_jobs_submitted_before_they_changed(store, tmp_path):
    job = make_job(store, tmp_path, "g" * 12, "ada", resources={"prices": {"rtx4090": 0.0, "a100": 0.0, "cpu": 0.0}})
    store.claim_next_queued()
    _record(store, tmp_path, job.id, [(T0, T0 + 3600, {"GPU": 1.0})],
            [NodeLife(node="n1", group="tier:4090", started_at=T0, ended_at=T0 + 3600, resources={"GPU": 1.0})])
    assert job_cost(store, store.get_job(job.id)).billed_usd == pytest.approx(0.35)  # the operator's, not 0
    store.billing = {**store.billing, "node_groups": {"cheap-4090": {"price_per_hour": 0.5}}}
    assert job_cost(store, store.get_job(job.id)).billed_usd == pytest.approx(0.5)
