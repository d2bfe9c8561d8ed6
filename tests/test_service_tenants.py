"""Tenants cannot reach each other's data: every input field of a job, from every place on the server, for its
owner, another user and an admin (`service.jobs.access`); and the checks run again when the job's runner starts.

    pytest tests/test_service_tenants.py -q
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from service.core.config import Settings
from service.jobs.executor import execute_job
from service.main import create_app
from tests.conftest import CORPUS, tiny_spec_dict

TOKEN = "bootstrap-admin-token"
FIELDS = ("data.train", "data.eval", "tokenizer.path", "embed.model_path", "model.pretrained")


@pytest.fixture
def team(tmp_path):
    """(app, admin, ada, bob) on a service whose storage roots are one shared prefix and one prefix per user."""
    settings = Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'data' / 'moedisco.db'}",
                        api_token=TOKEN, input_roots=[CORPUS.parent], runner="local",
                        storage_roots=["s3://corpora/shared", "s3://work/{user}"])
    app = create_app(settings, dispatch=False)
    with TestClient(app) as admin:
        admin.headers["Authorization"] = f"Bearer {TOKEN}"
        users = {}
        for name in ("ada", "bob"):
            assert admin.post("/v1/users", json={"name": name}).status_code == 201
            token = admin.post(f"/v1/users/{name}/tokens", json={"label": "t"}).json()["token"]
            users[name] = TestClient(app, headers={"Authorization": f"Bearer {token}"})
        yield app, admin, users["ada"], users["bob"]


def _with(field: str, value) -> dict:
    raw = tiny_spec_dict("ignored")
    section, key = field.split(".")
    raw.setdefault(section, {})[key] = str(value)
    return raw


def _submit(user: TestClient, field: str, value):
    return user.post("/v1/jobs", json=_with(field, value))


def _refused(response, field: str) -> bool:
    return response.status_code == 422 and any(
        ".".join(map(str, error["loc"][1:])) == field for error in response.json()["detail"])


def _places(app, ada: TestClient, bob: TestClient) -> dict:
    """Each place a corpus can be, as a spec names it: relative to MOEDISCO_DATA_DIR, or absolute."""
    data = app.state.settings.data_dir
    for area in ("users/ada", "users/bob", "shared"):
        (data / area).mkdir(parents=True, exist_ok=True)
        (data / area / "c.jsonl").write_text(CORPUS.read_text())
    jobs = {name: user.post("/v1/jobs", json=tiny_spec_dict("ignored", data={"train": str(CORPUS)})).json()["id"]
            for name, user in (("ada", ada), ("bob", bob))}
    for job in jobs.values():  # what a finished job leaves: its split of the corpus
        (data / "jobs" / job / "data").mkdir(parents=True)
        (data / "jobs" / job / "data" / "train.jsonl").write_text(CORPUS.read_text())
    (data / "users" / "ada" / "link.jsonl").symlink_to(data / "users" / "bob" / "c.jsonl")
    return {"own area": "users/ada/c.jsonl", "shared area": "shared/c.jsonl", "input root": str(CORPUS),
            "own job": f"jobs/{jobs['ada']}/data/train.jsonl",
            "other user's area": "users/bob/c.jsonl",
            "other user's job": f"jobs/{jobs['bob']}/data/train.jsonl", "a link to another's area": "users/ada/link.jsonl",
            "the job store": "moedisco.db", "all jobs": "jobs", "outside": "/etc/passwd"}


READABLE = {"own area", "shared area", "input root", "own job"}


def test_every_input_field_reads_only_the_owners_places(team):
    app, admin, ada, bob = team
    places = _places(app, ada, bob)
    for place, value in places.items():
        for field in FIELDS:
            response = _submit(ada, field, value)
            if place in READABLE and field in ("data.train", "data.eval"):
                assert response.status_code == 201, (place, field, response.text)
            elif place not in READABLE:
                assert _refused(response, field), (place, field, response.text)
                assert str(app.state.settings.data_dir / "users" / "bob") not in response.text  # nothing of bob's


def test_an_admin_reads_every_users_area_and_job(team):
    app, admin, ada, bob = team
    places = _places(app, ada, bob)
    for place in ("other user's area", "other user's job", "own area"):
        assert _submit(admin, "data.train", places[place]).status_code == 201, place
    for place in ("the job store", "all jobs", "outside"):
        assert _refused(_submit(admin, "data.train", places[place]), "data.train"), place


def test_storage_path_is_written_only_in_the_owners_places(team):
    app, admin, ada, bob = team
    places = _places(app, ada, bob)
    (app.state.settings.data_dir / "users" / "ada" / "ray").mkdir()
    assert _submit(ada, "resources.storage_path", "users/ada/ray").status_code == 201
    assert _submit(ada, "resources.storage_path", places["own job"]).status_code == 201
    for place in ("shared area", "other user's area", "other user's job", "all jobs", "outside"):
        assert _refused(_submit(ada, "resources.storage_path", places[place]), "resources.storage_path"), place


@pytest.mark.parametrize(("field", "uri", "ok"), [
    ("data.train", "s3://corpora/shared/c4/*.jsonl", True),
    ("data.train", "s3://work/ada/corpus.jsonl", True),
    ("data.train", "s3://work/bob/corpus.jsonl", False),  # another user's prefix
    ("data.train", "s3://work/ada/../bob/corpus.jsonl", False),
    ("resources.storage_path", "s3://work/ada/ray", True),
    ("resources.storage_path", "s3://corpora/shared/ray", False),  # shared prefixes are read-only
    ("resources.storage_path", "s3://work/bob/ray", False),
])
def test_object_storage_prefixes_are_per_user(team, field, uri, ok):
    app, admin, ada, bob = team
    response = _submit(ada, field, uri)
    assert (response.status_code == 201) if ok else _refused(response, field), response.text


def test_the_runner_checks_the_inputs_again_when_it_starts(team):
    """A job whose input became a way into another's place after it was queued (its file swapped for a link to
    bob's) fails when its runner starts, naming the field, before any stage reads it."""
    app, admin, ada, bob = team
    places = _places(app, ada, bob)
    job_id = _submit(ada, "data.train", places["own area"]).json()["id"]
    own = app.state.settings.data_dir / places["own area"]
    own.unlink()
    own.symlink_to(app.state.settings.data_dir / places["other user's area"])
    store, settings = app.state.store, app.state.settings
    assert store.claim_next_queued().id != job_id  # the corpus-root jobs `_places` queued first
    while (claimed := store.claim_next_queued()) is not None and claimed.id != job_id:
        pass
    assert execute_job(store, job_id, "local", rules=settings.access) == "failed"
    job = store.get_job(job_id)
    assert "inputs refused: data.train" in job.reason and not (settings.jobs_dir / job_id / "data").exists()


def test_an_open_api_refuses_to_serve_beyond_loopback(monkeypatch):
    from moedisco_cli.main import app as cli

    monkeypatch.delenv("MOEDISCO_API_TOKEN", raising=False)
    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--no-ray-serve"])
    assert result.exit_code == 2 and "MOEDISCO_API_TOKEN is not set" in result.output, result.output


def _routes(openapi: dict) -> list[tuple[str, str]]:
    """Every (method, path) under /v1: a route added later is covered without editing this test."""
    return [(method.upper(), path) for path, item in openapi["paths"].items() if path.startswith("/v1/")
            for method in item]


def test_every_route_for_every_kind_of_caller(team):
    """Every route x {no token, a revoked token, another user, the owner, an admin}: the first two get 401, another
    user never gets (or changes) anything of ada's, and ada and an admin reach her job."""
    app, admin, ada, bob = team
    job = _submit(ada, "data.train", str(CORPUS)).json()
    output = app.state.settings.jobs_dir / job["id"]
    (output / "final").mkdir(parents=True)
    (output / "final" / "config.json").write_text("{}")
    (output / "evaluation.json").write_text(json.dumps({"tasks": ["next_paragraph"], "limit": 4,
                                                        "models": {"moedisco": {"next_paragraph": {"acc": 0.5}}}}))
    assert ada.post("/v1/files", params={"name": "c.jsonl"}, content=CORPUS.read_bytes()).status_code == 201
    token_id = ada.get("/v1/users/ada/tokens").json()[0]["id"]
    assert admin.post("/v1/users", json={"name": "eve"}).status_code == 201
    eve = TestClient(app, headers={"Authorization": "Bearer " + admin.post(
        "/v1/users/eve/tokens", json={}).json()["token"]})
    assert admin.post("/v1/users/eve/revoke").status_code == 200
    values = {"job_id": job["id"], "path": "final/config.json", "name": "ada", "token_id": token_id}
    routes = [(method, path.format(**{key: values[key] for key in values if "{" + key + "}" in path}))
              for method, path in _routes(admin.get("/openapi.json").json())]
    routes = [(method, path.replace("/v1/files/ada", "/v1/files/c.jsonl")) for method, path in routes]
    assert len(routes) >= 20
    with TestClient(app) as anonymous:
        for method, path in routes:
            for caller in (anonymous, eve):
                assert caller.request(method, path, json={}).status_code == 401, (method, path)
    for method, path in routes:
        response = bob.request(method, path, json={"name": "x"})
        # Every user's own: their jobs, their files, themselves, and the cluster's node counts (no job in them).
        assert response.status_code in (403, 404, 422) or path in ("/v1/jobs", "/v1/files", "/v1/users/me",
                                                                   "/v1/cluster") \
            or (path.startswith("/v1/files") and response.status_code == 201), (method, path, response.status_code)
        leaked = ('"owner":"ada"', "users/ada", str(CORPUS), str(output))  # the 404 may echo the id bob sent
        assert not any(part in response.text for part in leaked), (method, path, response.text)
    assert ada.get(f"/v1/jobs/{job['id']}").json()["state"] == "queued"  # nothing of ada's changed
    assert [f["name"] for f in ada.get("/v1/files").json()] == ["c.jsonl"]
    assert ada.get("/v1/users/me").status_code == 200
    for caller in (ada, admin):
        for method, path in routes:
            if job["id"] in path and method == "GET":
                assert caller.request(method, path).status_code not in (401, 403, 404, 500), (method, path)


def test_the_evaluate_sections_paths_follow_the_same_rules(team):
    """A baseline model, lm-eval task folders (which lm-eval walks and may import code from) and the datasets cache
    (written to) are paths the job reads or writes like any other."""
    app, admin, ada, bob = team
    places = _places(app, ada, bob)
    data = app.state.settings.data_dir
    bob_final = data / places["other user's job"].replace("data/train.jsonl", "final")
    bob_final.mkdir()
    (data / "users" / "ada" / "cache").mkdir()

    def evaluate(**fields):
        return ada.post("/v1/jobs", json={**tiny_spec_dict("ignored", data={"train": str(CORPUS)}),
                                          "evaluate": {"tasks": ["next_paragraph"], **fields}})

    assert _refused(evaluate(baseline=str(bob_final)), "evaluate.baseline")
    assert _refused(evaluate(task_dirs=["users/ada", "/"]), "evaluate.task_dirs.1")
    assert _refused(evaluate(datasets_cache="users/bob"), "evaluate.datasets_cache")
    assert _refused(evaluate(datasets_cache="shared"), "evaluate.datasets_cache")  # read-only for users
    assert evaluate(task_dirs=["users/ada"], datasets_cache="users/ada/cache").status_code == 201


def test_an_input_root_around_the_data_folder_opens_nothing_in_it(tmp_path):
    """MOEDISCO_INPUT_ROOTS of a folder that holds MOEDISCO_DATA_DIR: the data folder keeps its own rules."""
    from service.jobs.access import Reader, input_errors

    settings = Settings(data_dir=tmp_path / "srv" / "data", input_roots=[tmp_path / "srv"])
    for place in ("users/bob/c.jsonl", "moedisco.db"):
        (settings.data_dir / place).parent.mkdir(parents=True, exist_ok=True)
        (settings.data_dir / place).write_text('{"text": "x"}\n')
    (tmp_path / "srv" / "corpus.jsonl").write_text('{"text": "x"}\n')
    ada = Reader("ada", is_admin=False, owns_job=lambda job_id: False)
    for place, refused in (("users/bob/c.jsonl", True), ("moedisco.db", True), (tmp_path / "srv/corpus.jsonl", False)):
        raw = {"data": {"train": str(place)}}
        assert bool(input_errors(raw, ada, settings.access)) == refused, place


def test_a_user_prefix_is_a_whole_segment_and_never_a_shared_one(tmp_path):
    from pydantic import ValidationError

    from service.jobs.access import Reader, input_errors

    with pytest.raises(ValidationError, match="whole last segment"):
        Settings(data_dir=tmp_path, storage_roots=["s3://w/{user}-tmp"])
    settings = Settings(data_dir=tmp_path, storage_roots=["s3://b/shared", "s3://b/{user}"])
    named_shared = Reader("shared", is_admin=False, owns_job=lambda job_id: False)
    assert input_errors({"resources": {"storage_path": "s3://b/shared/ray"}}, named_shared, settings.access)
    assert not input_errors({"data": {"train": "s3://b/shared/c.jsonl"}}, named_shared, settings.access)
