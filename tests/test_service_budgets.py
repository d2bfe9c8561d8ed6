"""Users, tokens and monthly budgets in the job store, on SQLite and PostgreSQL alike (the `store` fixture in
tests/conftest.py); the HTTP side is tests/test_service_users.py.

    MOEDISCO_TEST_POSTGRES_URL=$(bash service/scripts/start_postgres.sh) pytest tests/test_service_budgets.py -q
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

import pytest

from service.jobs import executor
from service.jobs.recorder import EventRecorder
from service.store.models import utcnow
from service.store.store import Store
from service.store.users import UserExists, Users, month_start
from tests.conftest import make_job


def _price(store: Store, tmp_path, job_id: str, usd: float) -> None:
    """One priced stage of the job, copied from its ledger file by the recorder as a finished stage would."""
    output = tmp_path / f"out-{job_id}"
    output.mkdir(exist_ok=True)
    (output / "cost.json").write_text(json.dumps({"stages": [
        {"stage": "finetune", "expert": None, "tier": "A100", "device_type": "a100", "num_devices": 1,
         "seconds": 60.0, "device_hours": 1 / 60, "price_per_hour": 2.28, "usd": usd, "simulated": True,
         "device": "cpu", "node": None}]}))
    EventRecorder(store, job_id, output).sync_costs()


def test_month_spend_and_budget_left_come_from_the_owners_cost_rows(store, tmp_path):
    users = Users(store)
    users.create_user("ada", monthly_budget_usd=2.0)
    with pytest.raises(UserExists):
        users.create_user("ada")
    for job_id, owner, usd in (("a" * 12, "ada", 0.5), ("b" * 12, "ada", 0.25), ("c" * 12, "bob", 9.0)):
        make_job(store, tmp_path, job_id, owner)
        _price(store, tmp_path, job_id, usd)
    assert users.month_spend("ada") == pytest.approx(0.75) and users.budget_left("ada") == pytest.approx(1.25)
    assert users.budget_left("bob") is None  # no user row: no budget
    _price(store, tmp_path, "a" * 12, 0.5)  # synced again, unchanged: still counted once, in this month
    assert users.month_spend("ada") == pytest.approx(0.75)
    next_month = month_start(utcnow()) + timedelta(days=32)
    assert users.month_spend("ada", now=next_month) == 0.0
    assert users.count_queued("ada") == 2 and store.list_jobs(None, 0, 10, owner="bob")[1] == 1


def test_tokens_authenticate_until_revoked(store):
    users = Users(store)
    users.create_user("ada")
    token, secret = users.create_token("ada", "laptop")
    assert token.sha256 == hashlib.sha256(secret.encode()).hexdigest() and secret not in token.sha256
    assert users.authenticate(secret).name == "ada"
    assert users.authenticate(secret + "x") is None and users.authenticate("é") is None
    _, other = users.create_token("ada")
    assert users.revoke_token("ada", token.id) and not users.revoke_token("ada", token.id)
    assert users.authenticate(secret) is None and users.authenticate(other).name == "ada"
    users.revoke_user("ada")
    assert users.authenticate(other) is None


def test_the_runner_is_asked_the_owners_budget_left(store, tmp_path, monkeypatch):
    """The executor hands the runner a hook that reads the owner's budget left from the store at each call."""
    asked = []

    def run(spec, events, should_stop, owner, budget_left=None):
        asked.append(budget_left())
        _price(store, tmp_path, job.id, 0.75)
        asked.append(budget_left())
        return {}

    monkeypatch.setitem(executor.RUNNERS, "local", run)
    monkeypatch.setattr(executor, "record_estimate", lambda *args: None)
    Users(store).create_user("ada", monthly_budget_usd=1.0)
    job = make_job(store, tmp_path, "d" * 12, "ada")
    store.claim_next_queued()
    assert executor.execute_job(store, job.id, "local") == "succeeded"
    assert asked == [1.0, 0.25]


def test_a_store_from_before_users_is_migrated(store, tmp_path):
    """A store as the previous release left it (no owner, no priced_at, no users or tokens tables) keeps its jobs,
    owned by the bootstrap admin, and their dollars count in the month each job was created."""
    from sqlalchemy import inspect, text

    make_job(store, tmp_path, "e" * 12)
    _price(store, tmp_path, "e" * 12, 0.5)
    with store.engine.begin() as connection:
        connection.execute(text("DROP TABLE moedisco_tokens"))
        connection.execute(text("DROP TABLE moedisco_users"))
        connection.execute(text("ALTER TABLE moedisco_jobs DROP COLUMN owner"))
        connection.execute(text("ALTER TABLE moedisco_costs DROP COLUMN priced_at"))
    assert "owner" not in {c["name"] for c in inspect(store.engine).get_columns("moedisco_jobs")}
    for _ in range(2):  # a second start finds everything in place
        migrated = Store(store.url)
        users = Users(migrated)
        assert migrated.get_job("e" * 12).owner == "admin"
        assert users.month_spend("admin") == pytest.approx(0.5)
        migrated.close()
    users.create_user("ada")
    assert users.authenticate(users.create_token("ada")[1]).name == "ada"
