"""Fuzz every operation of the OpenAPI schema with schemathesis: whatever comes in, no 5xx comes out.

The app runs without Ray (`dispatch=False`). One job exists with stages, costs, metrics and files, owned by the user
ada, and half of the generated job ids are replaced by its id (half the user names by `ada`), so the fuzzer reaches
past the 404 into every handler (and tries its paths on the artifact download). Each example is sent with the
admin's token, ada's or bob's (who owns nothing), so every route runs as owner, as stranger and as admin.
Bounded: a few examples per operation, no per-example deadline.

    pytest tests/test_service_fuzz.py -q
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from moedisco.job.events import Progress, StageFinished, StageStarted
from service.core.config import Settings
from service.jobs.recorder import EventRecorder
from service.main import create_app
from tests.conftest import CORPUS, tiny_spec_dict

TOKEN = "fuzz-token"
MAX_EXAMPLES = 12


def _app(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("fuzz")
    settings = Settings(data_dir=data_dir, database_url=f"sqlite:///{data_dir / 'moedisco.db'}", api_token=TOKEN,
                        input_roots=[CORPUS.parent], runner="local")
    return create_app(settings, dispatch=False)


def _seed_users(app) -> list[str]:
    """Tokens of the admin, of ada (a budget, owns the seeded job) and of bob (owns nothing)."""
    users = app.state.users
    users.create_user("ada", monthly_budget_usd=10.0, max_queued_jobs=3)
    users.create_user("bob")
    return [TOKEN, users.create_token("ada")[1], users.create_token("bob")[1]]


def _seed_job(app) -> str:
    """A job that looks half trained: stage rows, a priced stage, metrics records and output files."""
    store, job_id = app.state.store, "0123456789ab"
    spec = tiny_spec_dict(app.state.settings.jobs_dir / job_id)
    store.create_job(job_id, {**spec, "method": "moe_disco"}, "local", owner="ada")
    store.claim_next_queued()
    output = app.state.settings.jobs_dir / job_id
    (output / "final").mkdir(parents=True)
    (output / "final" / "config.json").write_text("{}")
    (output / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"stage": "submodel", "expert": 0, "step": 0, "eval_loss": 6.2},
        {"stage": "submodel", "expert": 0, "step": 4, "loss": 6.0, "eval_loss": 5.9}]) + "\n{broken")
    (output / "cost.json").write_text(json.dumps({"stages": [
        {"stage": "embed", "expert": None, "tier": "4090", "device_type": "rtx4090", "num_devices": 1,
         "seconds": 3.0, "device_hours": 0.001, "price_per_hour": 0.35, "usd": 0.00035, "simulated": True,
         "device": "cpu", "node": None}]}))
    record = EventRecorder(store, job_id, output)
    for event in (StageStarted(stage="embed"), StageFinished(stage="embed", summary={"seconds": 3.0}),
                  StageStarted(stage="submodel", expert=0),
                  Progress(stage="submodel", expert=0, step=4, total_steps=12, loss=6.0, eval_loss=5.9)):
        record(event)
    return job_id


@pytest.fixture(scope="module")
def fuzzed_app(tmp_path_factory):
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))  # its caches stay out of the work tree
    app = _app(tmp_path_factory)
    yield app, _seed_job(app), _seed_users(app)
    app.state.store.close()
    set_hypothesis_home_dir(None)


def _operations(app) -> list:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [result.ok() for result in schema.get_all_operations()]


def test_no_operation_answers_5xx(fuzzed_app):
    app, job_id, tokens = fuzzed_app
    operations = _operations(app)
    assert len(operations) >= 19  # every route is in the schema (users' included), so every route is fuzzed

    for operation in operations:
        @given(case=operation.as_strategy(), token=st.sampled_from(tokens))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def no_server_error(case, token):
            # Half the job ids become the seeded job's and half the user names ada's, so handlers run past 404.
            for name, seeded in (("job_id", job_id), ("name", "ada")):
                if name in (case.path_parameters or {}) and len(str(case.path_parameters[name])) % 2 == 0:
                    case.path_parameters[name] = seeded
            case.call_and_validate(headers={"Authorization": f"Bearer {token}"},
                                   checks=[schemathesis.checks.not_a_server_error])

        no_server_error()
