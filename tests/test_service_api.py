"""The REST API without Ray: validation (4xx naming the field, never 5xx), auth, artifact paths, listing.

The app runs with `dispatch=False`, so submitted jobs stay queued; job states are set through the store.

    pytest tests/test_service_api.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from moedisco.job.events import Progress, StageStarted
from service.core.config import Settings
from service.jobs.recorder import EventRecorder
from service.main import create_app
from service.store.models import StageRow, utcnow
from service.store.store import Store
from tests.conftest import CORPUS, REPO, tiny_spec_dict

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def settings(tmp_path) -> Settings:
    # database_url explicitly: a MOEDISCO_DATABASE_URL in the developer's shell must never receive test jobs.
    return Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'data' / 'moedisco.db'}",
                    api_token=TOKEN, input_roots=[CORPUS.parent], runner="local")


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings, dispatch=False), headers=AUTH) as test_client:
        yield test_client


def spec(**sections) -> dict:
    return tiny_spec_dict("ignored", **sections)


def submit(client, **sections) -> dict:
    response = client.post("/v1/jobs", json=spec(**sections))
    assert response.status_code == 201, response.text
    return response.json()


def _set(raw: dict, dotted: str, value) -> dict:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return raw


BAD_FIELDS = [
    ("model.num_experts", 1),
    ("model.num_experts", "four"),
    ("submodel.steps", 0),
    ("submodel.lr", -1.0),
    ("finetune.schedule", "sawtooth"),
    ("data.eval_fraction", 0.9),
    ("cluster.method", "dbscan"),
    ("name", "has spaces/and slashes"),
    ("method", "dense"),
    ("max_cost_usd", 0),
    ("max_cost_usd", "lots"),
    ("model.lerning_rate", 0.1),  # a typo: unknown keys are errors
    ("resources.prices", {"rtx4090": -1.0, "a100": 2.0}),
    ("data.train", None),
    ("data.train", "no/such/corpus.jsonl"),
    ("data.train", "/etc/passwd"),  # exists, but outside MOEDISCO_DATA_DIR and MOEDISCO_INPUT_ROOTS
    ("data.text_field", "te\x00xt"),
    ("resources.storage_path", "/tmp/elsewhere"),
    ("submodel.betas", [0.9, "x"]),
    ("model.hidden_size", 1_000_000_000),  # beyond MOEDISCO_MAX_MODEL_PARAMETERS
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS, ids=[f"{f}={v!r}" for f, v in BAD_FIELDS])
def test_bad_spec_is_422_naming_the_field(client, field, value):
    response = client.post("/v1/jobs", json=_set(spec(), field, value))
    assert response.status_code == 422, response.text
    locations = [".".join(str(p) for p in error["loc"][1:]) for error in response.json()["detail"]]
    top = field.split(".")[0]
    assert any(loc.startswith(top) for loc in locations), (field, locations)


def test_a_job_that_fits_no_device_is_422_naming_the_stage_device_and_shortfall(client):
    devices = {"rtx4090": {"memory_gb": 1e-5, "bf16_tflops": 165.2}, "a100": {"memory_gb": 80, "bf16_tflops": 312}}
    response = client.post("/v1/jobs", json=spec(resources={"devices": devices}))
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"][1:] == ["submodel"] and "rtx4090" in error["msg"] and "GB short" in error["msg"]


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_the_memory_plan_is_the_services_runners(settings, tmp_path, runner):
    from tests.test_estimate_cost import fits_only_sharded

    raw = {**fits_only_sharded(tmp_path), "output_dir": "ignored"}
    with TestClient(create_app(settings.model_copy(update={"runner": runner}), dispatch=False),
                    headers=AUTH) as client:
        response = client.post("/v1/jobs", json=raw)
    if runner == "ray":  # Ray shards each submodel over its 2 workers
        assert response.status_code == 201, response.text
    else:  # the local runner trains on one device, where it does not fit
        assert response.status_code == 422, response.text
        assert "the local runner never shards" in response.json()["detail"][0]["msg"]


def test_model_shape_error_names_the_section(client):
    response = client.post("/v1/jobs", json=spec(model={"num_experts": 2, "num_experts_per_tok": 3}))
    assert response.status_code == 422
    assert any(error["loc"][:2] == ["body", "model"] and "num_experts_per_tok" in error["msg"]
               for error in response.json()["detail"])


@pytest.mark.parametrize("body", ["", "not json", "[]", "null", '{"max_cost_usd": NaN}', '{"seed": Infinity}',
                                  "[" * 50_000, '{"name": "x"}'])
def test_malformed_bodies_are_4xx(client, body):
    response = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text


def test_non_finite_numbers_are_refused(client):
    raw = json.dumps(spec()).replace('"seed": 0', '"seed": 0, "max_cost_usd": 1e999')
    response = client.post("/v1/jobs", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    raw = json.dumps(_set(spec(), "resources.prices", {"rtx4090": 0.35, "a100": 2.28, "cpu": 0.0}))
    raw = raw.replace('"a100": 2.28', '"a100": Infinity')
    response = client.post("/v1/jobs", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert ["body", "resources", "prices", "a100"] in [e["loc"] for e in response.json()["detail"]]


def test_output_dir_is_placed_under_the_data_dir(client, settings):
    job = client.post("/v1/jobs", json=spec() | {"output_dir": "/etc/evil"}).json()
    assert job["output_dir"] == str(settings.data_dir.resolve() / "jobs" / job["id"])
    detail = client.get(f"/v1/jobs/{job['id']}").json()
    assert detail["spec"]["output_dir"] == job["output_dir"]
    assert detail["spec"]["data"]["train"] == str(CORPUS.resolve())


def test_relative_input_paths_start_at_the_data_dir(client, settings):
    (settings.data_dir / "shared" / "corpora").mkdir(parents=True)
    (settings.data_dir / "shared" / "corpora" / "c.jsonl").write_text('{"text": "hello"}\n')
    job = client.post("/v1/jobs", json=_set(spec(), "data.train", "shared/corpora/c.jsonl")).json()
    assert client.get(f"/v1/jobs/{job['id']}").json()["spec"]["data"]["train"] == str(
        (settings.data_dir / "shared" / "corpora" / "c.jsonl").resolve())


ROUTES = [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/0123456789ab"),
          ("POST", "/v1/jobs/0123456789ab/cancel"), ("GET", "/v1/jobs/0123456789ab/cost"),
          ("GET", "/v1/jobs/0123456789ab/metrics"), ("GET", "/v1/jobs/0123456789ab/artifacts"),
          ("GET", "/v1/jobs/0123456789ab/artifacts/cost.json"), ("GET", "/v1/jobs/0123456789ab/report"),
          ("GET", "/v1/users/me"), ("GET", "/v1/users"), ("POST", "/v1/users/ada/tokens"),
          ("POST", "/v1/files?name=c.jsonl"), ("GET", "/v1/files"), ("DELETE", "/v1/files/c.jsonl"),
          ("GET", "/metrics")]


BAD_HEADERS = [None, b"Bearer wrong-token", b"Basic dGVzdA==", f"Bearer {TOKEN}x".encode(),
               "Bearer é".encode("latin-1"), b"Bearer", TOKEN.encode()]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_but_healthz_needs_the_token(settings, method, path):
    with TestClient(create_app(settings, dispatch=False)) as anonymous:
        for header in BAD_HEADERS:
            response = anonymous.request(method, path, headers={"Authorization": header} if header else {})
            assert response.status_code == 401, (header, response.text)
            assert response.headers["WWW-Authenticate"] == "Bearer"
        assert anonymous.get("/healthz").json()["status"] == "ok"


def test_without_a_token_only_loopback_clients_are_served(tmp_path):
    open_settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'm.db'}", api_token=None,
                             host="0.0.0.0")
    with pytest.raises(ValueError, match="MOEDISCO_API_TOKEN is not set"):
        open_settings.effective_host()  # an open API is not bound beyond loopback
    assert open_settings.model_copy(update={"host": "127.0.0.1"}).effective_host() == "127.0.0.1"
    app = create_app(open_settings, dispatch=False)
    with TestClient(app, client=("127.0.0.1", 5000)) as local, TestClient(app, client=("10.1.2.3", 5000)) as remote:
        assert local.get("/v1/jobs").status_code == 200
        assert remote.get("/v1/jobs").status_code == 403


def test_artifact_paths_cannot_escape_the_job(client, settings):
    job = submit(client)
    output = settings.jobs_dir / job["id"]
    (output / "sub").mkdir(parents=True)
    (output / "sub" / "ok.txt").write_text("inside")
    (settings.data_dir / "secret.txt").write_text("outside")
    (output / "link").symlink_to(settings.data_dir / "secret.txt")
    base = f"/v1/jobs/{job['id']}/artifacts"
    assert client.get(f"{base}/sub/ok.txt").text == "inside"
    listed = [a["path"] for a in client.get(base).json()["data"]]
    assert listed == ["sub/ok.txt"]
    for escape in ["..%2Fsecret.txt", "..%2F..%2Fsecret.txt", "sub%2F..%2F..%2F..%2Fsecret.txt", "link",
                   "%2Fetc%2Fpasswd", "..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd", "sub%00", "sub"]:
        response = client.get(f"{base}/{escape}")
        assert response.status_code == 404, (escape, response.status_code)
        assert "outside" not in response.text and "root:" not in response.text


def test_list_filters_by_state_and_paginates(client):
    store = client.app.state.store
    ids = [submit(client, name=f"job-{i}")["id"] for i in range(7)]
    for job_id in ids[:2]:
        store.claim_next_queued()
    store.finish(ids[0], "failed", "boom")
    page = client.get("/v1/jobs", params={"limit": 3}).json()
    assert page["count"] == 7 and [j["id"] for j in page["data"]] == ids[::-1][:3]
    rest = client.get("/v1/jobs", params={"limit": 3, "offset": 6}).json()["data"]
    assert [j["id"] for j in rest] == [ids[0]]
    assert [j["id"] for j in client.get("/v1/jobs", params={"state": "failed"}).json()["data"]] == [ids[0]]
    assert client.get("/v1/jobs", params={"state": "running"}).json()["count"] == 1
    assert client.get("/v1/jobs", params={"state": ["queued", "running"]}).json()["count"] == 6
    for bad in ({"state": "exploded"}, {"limit": 0}, {"limit": 101}, {"offset": -1}, {"offset": 2**63}):
        assert client.get("/v1/jobs", params=bad).status_code == 422, bad


def test_cancel_queued_then_conflict(client):
    job = submit(client)
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel").json()
    assert cancelled["state"] == "cancelled" and cancelled["reason"]
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409
    assert client.get("/v1/jobs/nosuchjob").status_code == 404


def test_a_queued_job_answers_every_read_route(client):
    job = submit(client)
    base = f"/v1/jobs/{job['id']}"
    assert client.get(base).json()["stages"] == []
    assert client.get(f"{base}/cost").json()["total_usd"] == 0
    assert client.get(f"{base}/metrics").json()["count"] == 0
    assert client.get(f"{base}/artifacts").json()["count"] == 0
    assert "has no `evaluate` section" in client.get(f"{base}/evaluation").json()["detail"]
    assert "<html>" in client.get(f"{base}/report").text
    assert 'moedisco_jobs{owner="admin",state="queued"} 1.0' in client.get("/metrics").text
    assert client.get("/openapi.json").json()["paths"]["/v1/jobs"]["post"]
    assert client.get("/docs").status_code == 200


def test_the_evaluation_route_serves_the_evaluate_stages_record(client):
    job = submit(client, evaluate={"tasks": ["next_paragraph"], "limit": 10})
    base = f"/v1/jobs/{job['id']}"
    assert "has not finished yet" in client.get(f"{base}/evaluation").json()["detail"]
    scores = {"moe_disco": {"next_paragraph": {"acc": 0.5, "acc_norm": 0.4, "num_fewshot": None, "samples": 10}}}
    folder = Path(job["output_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evaluation.json").write_text(json.dumps({"tasks": ["next_paragraph"], "limit": 10, "models": scores}))
    served = client.get(f"{base}/evaluation").json()
    assert served["models"] == scores and served["baseline"] is None
    assert "next_paragraph" in client.get(f"{base}/report").text


def test_cost_is_live_while_a_stage_runs(client):
    job = submit(client)
    store = client.app.state.store
    store.claim_next_queued()
    EventRecorder(store, job["id"], job["output_dir"])(StageStarted(stage="finetune"))
    with store.session() as session, session.begin():  # the stage started an hour ago
        session.execute(update(StageRow).values(started_at=utcnow() - timedelta(hours=1)))
    cost = client.get(f"/v1/jobs/{job['id']}/cost").json()
    (row,) = cost["stages"]
    assert cost["live"] and not row["final"] and (row["stage"], row["tier"]) == ("finetune", "A100")
    assert row["usd"] == pytest.approx(2.28, rel=0.01) and cost["total_usd"] == row["usd"]


@pytest.fixture
def cached_client(settings):
    """The API with cache entries that never expire by age: only a version change may refresh a view."""
    app = create_app(settings.model_copy(update={"read_cache_max_age_s": 3600.0}), dispatch=False)
    with TestClient(app, headers=AUTH) as test_client:
        yield test_client


def test_polled_views_are_cached_until_the_job_changes_in_any_process(cached_client, settings):
    client, views = cached_client, cached_client.app.state.views
    job = submit(client)
    base = f"/v1/jobs/{job['id']}"
    first = client.get(base).content
    hits = views.hits
    assert client.get(base).content == first and views.hits == hits + 1  # unchanged: served from the cache
    # The job actor writes through a store of its own (another process, another engine) on the same database.
    actor_store = Store(settings.effective_database_url)
    try:
        actor_store.claim_next_queued()
        assert client.get(base).json()["state"] == "running"
        record = EventRecorder(actor_store, job["id"], job["output_dir"])
        record(StageStarted(stage="submodel", expert=1))
        record(Progress(stage="submodel", expert=1, step=4, total_steps=12, loss=5.0))
        (stage,) = client.get(base).json()["stages"]
        assert (stage["stage"], stage["expert"], stage["step"], stage["loss"]) == ("submodel", 1, 4, 5.0)
        record(Progress(stage="submodel", expert=1, step=8, total_steps=12, loss=4.0))
        assert client.get(base).json()["stages"][0]["step"] == 8
        actor_store.request_cancel(job["id"])
        assert client.get(base).json()["cancel_requested"] is True
        actor_store.finish(job["id"], "cancelled", "asked")
        detail = client.get(base).json()
        assert (detail["state"], detail["reason"], detail["stages"][0]["state"]) == ("cancelled", "asked", "stopped")
    finally:
        actor_store.close()


def test_cached_cost_prices_running_stages_up_to_each_request(cached_client):
    client, store = cached_client, cached_client.app.state.store
    job = submit(client)
    store.claim_next_queued()
    EventRecorder(store, job["id"], job["output_dir"])(StageStarted(stage="submodel", expert=0))
    path = f"/v1/jobs/{job['id']}/cost"
    first = client.get(path).json()["stages"][0]
    time.sleep(0.05)
    hits = client.app.state.views.hits
    second = client.get(path).json()["stages"][0]
    assert client.app.state.views.hits == hits + 1  # the store was not read again ...
    assert not second["final"] and second["seconds"] > first["seconds"]  # ... and yet the clock was


def test_cached_cost_sees_a_new_measured_baseline(cached_client, tmp_path):
    client, store = cached_client, cached_client.app.state.store
    moe = submit(client)
    path = f"/v1/jobs/{moe['id']}/cost"
    assert client.get(path).json()["baseline"] is None
    baseline = submit(client, method="full_parameter")
    store.claim_next_queued()
    store.claim_next_queued()
    assert client.get(path).json()["baseline"] is None  # running: not a baseline yet
    ledger = Path(baseline["output_dir"]) / "cost.json"
    ledger.parent.mkdir(parents=True)
    ledger.write_text(json.dumps({"stages": [{"stage": "full_parameter", "expert": None, "tier": "A100",
                                              "device_type": "a100", "num_devices": 1, "seconds": 3600.0,
                                              "device_hours": 1.0, "price_per_hour": 2.28, "usd": 2.28,
                                              "simulated": True, "device": "cpu", "node": None}]}))
    EventRecorder(store, baseline["id"], baseline["output_dir"]).sync_costs()
    store.finish(baseline["id"], "succeeded")
    cost = client.get(path).json()
    assert cost["baseline"] == {"kind": "measured", "usd": 2.28, "job_id": baseline["id"]}


def test_a_replica_can_run_at_a_given_niceness(tmp_path):
    """Niceness is per thread on Linux: every thread of the replica's process must move, not only the main one.
    Raising it needs no privilege, so a child process raises its own to 7 and reports each thread's."""
    script = """
import os, threading, json
from service.serve import set_process_niceness
stop = threading.Event()
threads = [threading.Thread(target=stop.wait) for _ in range(3)]
for thread in threads: thread.start()
ok = set_process_niceness(7)
print(json.dumps([ok] + [os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")]))
stop.set()
"""
    if not Path("/proc/self/task").is_dir():
        pytest.skip("per-thread niceness is Linux's")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO)
    ok, *niceness = json.loads(out.stdout.strip().splitlines()[-1])
    assert ok and len(niceness) >= 4 and set(niceness) == {7}
