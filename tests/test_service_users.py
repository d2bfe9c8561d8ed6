"""A service a team shares, over real HTTP against the real app (uvicorn on loopback; no Ray, `dispatch=False`, so
submitted jobs stay queued): users and their tokens, who sees which job, budgets, queue limits, request limits.

    pytest tests/test_service_users.py -q
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import update

from service.core.config import Settings
from service.jobs.recorder import EventRecorder
from service.main import create_app
from service.store.models import StoredCost, utcnow
from tests.conftest import CORPUS, tiny_spec_dict
from tests.helpers import LiveServer

TOKEN = "bootstrap-admin-token"
ARTIFACT = "final/config.json"
LONG_FINETUNE = {"steps": 1_000_000, "batch_size": 10_000}


@pytest.fixture
def service(tmp_path):
    """(app, url) of a live server whose admin is MOEDISCO_API_TOKEN=TOKEN."""
    settings = Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'data' / 'moedisco.db'}",
                        api_token=TOKEN, input_roots=[CORPUS.parent], runner="local", max_queued_jobs_per_user=2,
                        max_request_bytes=64_000)
    app = create_app(settings, dispatch=False)
    with LiveServer(app) as url:
        yield app, url


def client(url: str, token: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def add_user(admin: httpx.Client, name: str, **limits) -> httpx.Client:
    """Create `name` through the API and return a client with their first token."""
    assert admin.post("/v1/users", json={"name": name, **limits}).status_code == 201
    token = admin.post(f"/v1/users/{name}/tokens", json={"label": "test"}).json()["token"]
    return client(str(admin.base_url), token)


def submit(user: httpx.Client, **sections) -> httpx.Response:
    return user.post("/v1/jobs", json=tiny_spec_dict("ignored", **sections))


@pytest.fixture
def team(service):
    """(app, admin, ada, bob): two users without budgets."""
    app, url = service
    admin = client(url, TOKEN)
    return app, admin, add_user(admin, "ada"), add_user(admin, "bob")


def test_tokens_are_shown_once_and_stored_hashed(service):
    app, url = service
    admin = client(url, TOKEN)
    assert admin.post("/v1/users", json={"name": "ada", "monthly_budget_usd": 5}).json()["monthly_budget_usd"] == 5
    created = admin.post("/v1/users/ada/tokens", json={"label": "laptop"}).json()
    secret = created["token"]
    assert secret.startswith("mdt_") and len(secret) > 40
    listed = admin.get("/v1/users/ada/tokens").json()
    assert [t["id"] for t in listed] == [created["id"]] and "token" not in listed[0]
    app.state.store.engine.dispose()  # flush SQLite's WAL into the file before reading its bytes
    stored = b"".join(p.read_bytes() for p in app.state.settings.data_dir.glob("moedisco.db*"))
    assert secret.encode() not in stored and hashlib.sha256(secret.encode()).hexdigest().encode() in stored
    me = client(url, secret).get("/v1/users/me").json()
    assert (me["name"], me["is_admin"], me["monthly_budget_usd"], me["month_spend_usd"]) == ("ada", False, 5, 0)
    assert admin.get("/v1/users/me").json()["name"] == "admin"  # MOEDISCO_API_TOKEN stays the admin


def test_admin_routes_refuse_users_and_bad_input_is_named(team):
    _, admin, ada, _ = team
    assert admin.post("/v1/users", json={"name": "ada"}).status_code == 409
    for reserved in ("admin", "me"):
        assert admin.post("/v1/users", json={"name": reserved}).status_code == 409
    bad = admin.post("/v1/users", json={"name": "Ada Lovelace", "monthly_budget_usd": -1})
    assert bad.status_code == 422
    assert {tuple(e["loc"]) for e in bad.json()["detail"]} == {("body", "name"), ("body", "monthly_budget_usd")}
    for method, path in [("POST", "/v1/users"), ("GET", "/v1/users"), ("PATCH", "/v1/users/bob"),
                         ("POST", "/v1/users/bob/revoke"), ("GET", "/metrics")]:
        assert ada.request(method, path, json={"name": "eve"}).status_code in (403, 404), (method, path)
    assert ada.get("/v1/users/bob").status_code == 404  # another user's account does not exist for ada
    assert ada.post("/v1/users/bob/tokens", json={}).status_code == 404
    assert [u["name"] for u in admin.get("/v1/users").json()] == ["ada", "bob"]


def _job_routes(openapi: dict) -> list[tuple[str, str]]:
    """Every (method, path) of the API that names a job: a route added later is covered without editing this."""
    return [(method.upper(), path) for path, item in openapi["paths"].items() if "{job_id}" in path
            for method in item]


def _fill(path: str, job_id: str) -> str:
    return path.replace("{job_id}", job_id).replace("{path}", ARTIFACT)


def test_another_users_job_is_404_on_every_route(team):
    app, admin, ada, bob = team
    job = submit(ada).json()
    assert job["owner"] == "ada"
    output = app.state.settings.jobs_dir / job["id"]
    (output / "final").mkdir(parents=True)
    (output / ARTIFACT).write_text("{}")
    # An evaluate stage's record, so that every route has something of the job to show its owner.
    (output / "evaluation.json").write_text(json.dumps({"tasks": ["next_paragraph"], "limit": 4,
                                                        "models": {"moedisco": {"next_paragraph": {"acc": 0.5}}}}))
    routes = _job_routes(admin.get("/openapi.json").json())
    assert len(routes) >= 8  # job, cancel, resume, cost, metrics, artifacts, one artifact, report
    for method, path in routes:
        response = bob.request(method, _fill(path, job["id"]))
        assert response.status_code == 404, (method, path, response.text)
        assert "ada" not in response.text
    for method, path in routes:  # the routes do reach the job for its owner, and for an admin
        for caller in (ada, admin):
            assert caller.request(method, _fill(path, job["id"])).status_code not in (404, 500), (method, path)
    assert bob.get("/v1/jobs").json()["count"] == 0
    assert [j["id"] for j in ada.get("/v1/jobs").json()["data"]] == [job["id"]]
    assert admin.get("/v1/jobs").json()["data"][0]["owner"] == "ada"
    assert admin.get("/v1/jobs", params={"owner": "bob"}).json()["count"] == 0
    assert bob.get("/v1/jobs", params={"owner": "ada"}).json()["count"] == 0  # only admins pick an owner
    assert admin.get(f"/v1/jobs/{job['id']}").json()["owner"] == "ada"
    assert ada.get(f"/v1/jobs/{job['id']}/cost").json()["owner"] == "ada"
    assert 'moedisco_jobs{owner="ada",state="queued"}' in admin.get("/metrics").text


def test_a_revoked_token_is_refused_at_once(team):
    _, admin, ada, _ = team
    second = ada.post("/v1/users/ada/tokens", json={"label": "ci"}).json()  # a user makes their own tokens
    ada_ci = client(str(admin.base_url), second["token"])
    first_id = next(t["id"] for t in ada.get("/v1/users/ada/tokens").json() if t["label"] == "test")
    assert ada.get("/v1/jobs").status_code == 200
    assert admin.delete(f"/v1/users/ada/tokens/{first_id}").status_code == 204
    assert ada.get("/v1/jobs").status_code == 401  # the very next request
    assert ada_ci.get("/v1/jobs").status_code == 200
    assert admin.delete(f"/v1/users/ada/tokens/{first_id}").status_code == 404  # already revoked
    assert admin.post("/v1/users/ada/revoke").json()["revoked_at"] is not None
    assert ada_ci.get("/v1/users/me").status_code == 401
    assert admin.post("/v1/users/ada/tokens", json={}).status_code == 409
    assert admin.get("/v1/jobs").status_code == 200


def test_queued_jobs_are_limited_per_user(team):
    _, admin, ada, bob = team
    assert [submit(ada).status_code for _ in range(2)] == [201, 201]
    refused = submit(ada)
    assert refused.status_code == 429 and "2 queued jobs (limit 2)" in refused.json()["detail"]
    assert submit(bob).status_code == 201  # a limit per user, not per service
    assert admin.patch("/v1/users/ada", json={"max_queued_jobs": 3}).json()["max_queued_jobs"] == 3
    assert submit(ada).status_code == 201
    assert all(submit(admin).status_code == 201 for _ in range(3))  # the bootstrap admin has no limits


def _spend(app, job_id: str, usd: float) -> None:
    """Price one stage of the job as its runner would: the ledger file, then the recorder copies it."""
    output = app.state.settings.jobs_dir / job_id
    output.mkdir(parents=True, exist_ok=True)
    (output / "cost.json").write_text(json.dumps({"stages": [
        {"stage": "finetune", "expert": None, "tier": "A100", "device_type": "a100", "num_devices": 1,
         "seconds": 60.0, "device_hours": 1 / 60, "price_per_hour": 2.28, "usd": usd, "simulated": True,
         "device": "cpu", "node": None}]}))
    EventRecorder(app.state.store, job_id, output).sync_costs()


def test_monthly_budget_is_checked_at_submission(team):
    app, admin, ada, _ = team
    admin.patch("/v1/users/ada", json={"monthly_budget_usd": 1.0})
    job = submit(ada).json()
    assert app.state.store.get_job(job["id"]).estimate["total_usd"] < 1.0  # estimated once, here
    huge = submit(ada, finetune=LONG_FINETUNE)  # some 10^12 tokens
    assert huge.status_code == 403 and "estimated at $" in huge.json()["detail"]
    _spend(app, job["id"], 1.5)
    me = ada.get("/v1/users/me").json()
    assert (me["month_spend_usd"], me["budget_left_usd"]) == (1.5, -0.5)
    assert submit(ada).status_code == 403
    app.state.store.finish(job["id"], "failed", "lost")
    assert ada.post(f"/v1/jobs/{job['id']}/resume").status_code == 403
    with app.state.store.session() as session, session.begin():  # the spend was last month's after all
        session.execute(update(StoredCost).values(priced_at=utcnow() - timedelta(days=40)))
    assert ada.get("/v1/users/me").json()["month_spend_usd"] == 0
    assert ada.post(f"/v1/jobs/{job['id']}/resume").status_code == 200
    admin.patch("/v1/users/ada", json={"monthly_budget_usd": None})
    assert submit(ada, finetune=LONG_FINETUNE).status_code == 201


def test_request_bodies_are_bounded(service):
    _, url = service
    admin = client(url, TOKEN)
    big = json.dumps(tiny_spec_dict("ignored", name="x" * 100_000))
    assert admin.post("/v1/jobs", content=big, headers={"Content-Type": "application/json"}).status_code == 413
    chunked = admin.post("/v1/jobs", content=iter([big[:30_000].encode(), big[30_000:].encode()]),
                         headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413 and "MOEDISCO_MAX_REQUEST_BYTES" in chunked.json()["detail"]


def test_a_422_echoes_only_a_short_prefix_of_a_huge_value(tmp_path):
    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'm.db'}", api_token=TOKEN,
                        input_roots=[CORPUS.parent], max_request_bytes=60_000_000)
    with LiveServer(create_app(settings, dispatch=False)) as url:
        admin = client(url, TOKEN)
        for body in (tiny_spec_dict("ignored", name="x" * 50_000_000), {"junk": ["y" * 1000] * 50_000}):
            response = admin.post("/v1/jobs", json=body)
            assert response.status_code == 422 and len(response.content) < 10_000, len(response.content)
            assert any(error["loc"][:2] in (["body", "name"], ["body", "junk"], ["body", "data"])
                       for error in response.json()["detail"])


def test_the_command_line_manages_users_and_tokens(service):
    from typer.testing import CliRunner

    from moedisco_cli.main import app as cli_app

    _, url = service

    def cli(token: str, *args: str):
        result = CliRunner().invoke(cli_app, list(args), env={"MOEDISCO_API_URL": url, "MOEDISCO_API_TOKEN": token,
                                                              "COLUMNS": "200"})
        return result.exit_code, result.output

    code, output = cli(TOKEN, "users", "create", "ada", "--budget", "50", "--max-queued", "4")
    assert code == 0 and "user ada created" in output
    secret = next(word for word in output.split() if word.startswith("mdt_"))
    code, output = cli(secret, "users", "me")
    assert code == 0 and "ada" in output and "$50.0000" in output
    code, output = cli(secret, "tokens", "create", "ada", "--label", "laptop")
    token_id = output.split()[1]
    assert code == 0 and "laptop" in cli(secret, "tokens", "list", "ada")[1]
    assert cli(TOKEN, "users", "set", "ada", "--no-budget")[0] == 0
    assert cli(TOKEN, "users", "list")[1].count("ada") == 1
    assert cli(secret, "users", "list")[0] == 2  # not an admin: refused, and said so
    assert cli(TOKEN, "tokens", "revoke", "ada", token_id)[0] == 0
    assert cli(TOKEN, "users", "revoke", "ada")[0] == 0
    code, output = cli(secret, "users", "me")
    assert code == 2 and "HTTP 401" in output
