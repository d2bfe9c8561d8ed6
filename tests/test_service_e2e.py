"""End to end: the API on Ray Serve over real HTTP, jobs in detached Ray actors (local runner), the CLI against it.

One local Ray instance and one Serve application for the module, with two API replicas (so the queue runs in its
own `MoediscoDispatcher` deployment, woken through a handle on every submission). Three jobs are submitted at once
with room for two: the third waits in the queue. One job trains to `succeeded` (cost, report, metrics and artifacts then answer
with its real numbers), one stops at its budget, and the queued one is cancelled while it runs.

    pytest tests/test_service_e2e.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve
from typer.testing import CliRunner

from moedisco_cli.api_client import ApiClient
from moedisco_cli.main import app
from service.schemas import TERMINAL_STATES
from service.serve import build_app
from tests.conftest import CORPUS, tiny_spec_dict
from tests.helpers import free_port, wait_for_state, wait_until

pytestmark = pytest.mark.slow

TOKEN = "e2e-token"
JOB_TIMEOUT_S = 300
TWO_EXPERTS = {"num_experts": 2, "num_experts_per_tok": 1}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("service")
    ray.init(address="local", num_cpus=2, object_store_memory=150 * 2**20, include_dashboard=False,
             namespace="moedisco-e2e", log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"data_dir": str(data_dir), "database_url": f"sqlite:///{data_dir / 'moedisco.db'}",
                             "api_token": TOKEN, "runner": "local",
                             "input_roots": [str(CORPUS.parent)], "max_running_jobs": 2,
                             "dispatch_interval_s": 0.5, "ray_namespace": "moedisco-e2e",
                             "serve_num_replicas": 2}),
                  name="moedisco-api", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()  # a local instance: its detached job actors go with it


@pytest.fixture(scope="module")
def client(service) -> ApiClient:
    return ApiClient(service, TOKEN, timeout=60)


@pytest.fixture(scope="module")
def jobs(client) -> dict:
    """Submit three jobs at once (room for two), and note what the third was doing while two ran."""
    long_training = {"steps": 400, "checkpoint_every": 4, "eval_every": 4}
    submitted = {
        "tiny": client.submit(tiny_spec_dict("x", name="tiny", model=TWO_EXPERTS)),
        "budget": client.submit(tiny_spec_dict("x", name="budget", model=TWO_EXPERTS, max_cost_usd=1e-9)),
        "cancel": client.submit(tiny_spec_dict("x", name="cancel", model=TWO_EXPERTS, submodel=long_training)),
    }
    wait_until(lambda: client.jobs(["running"])["count"] == 2, 60, what="two jobs running")
    submitted["third_while_two_ran"] = client.job(submitted["cancel"]["id"])["state"]
    return submitted


def cli(url: str, *args: str):
    return CliRunner().invoke(app, list(args), env={"MOEDISCO_API_URL": url, "MOEDISCO_API_TOKEN": TOKEN,
                                                     "COLUMNS": "200"})


def test_queue_holds_the_third_job(jobs):
    assert jobs["third_while_two_ran"] == "queued"


def test_two_api_replicas_share_one_dispatcher(service):
    deployments = serve.status().applications["moedisco-api"].deployments
    running = {name: d.replica_states.get("RUNNING", 0) for name, d in deployments.items()}
    assert running == {"MoediscoAPI": 2, "MoediscoDispatcher": 1}


def test_tiny_job_succeeds_and_reports_real_numbers(service, client, jobs):
    job_id = jobs["tiny"]["id"]
    followed = cli(service, "status", job_id, "--follow", "--interval", "0.5")
    assert followed.exit_code == 0, followed.output
    assert "succeeded" in followed.output and "submodel 1" in followed.output
    job = client.job(job_id)
    stages = {(s["stage"], s["expert"]): s for s in job["stages"]}
    assert all(s["state"] == "finished" for s in stages.values())
    assert stages[("finetune", None)]["step"] == stages[("finetune", None)]["total_steps"] == 8
    assert stages[("submodel", 1)]["eval_loss"] > 0 and job["attempts"] == 1

    cost = client.cost(job_id)
    rows = {(r["stage"], r["expert"]): r for r in cost["stages"]}
    assert rows[("submodel", 0)]["tier"] == "4090" and rows[("submodel", 0)]["price_per_hour"] == 0.35
    assert rows[("finetune", None)]["tier"] == "A100" and rows[("finetune", None)]["usd"] > 0
    assert cost["total_usd"] == pytest.approx(sum(r["usd"] for r in cost["stages"])) and not cost["live"]
    assert cost["baseline"]["kind"] == "estimate" and cost["baseline"]["usd"] > 0
    assert cost["savings_basis"] == "estimate" and cost["savings_pct"] is not None
    # The savings compare two estimates, both shown: 100 x (baseline - this job's estimate) / baseline.
    assert cost["savings_pct"] == pytest.approx(100 * (1 - cost["estimate_usd"] / cost["baseline"]["usd"]), abs=0.01)
    ledger = json.loads(http_get(service, f"/v1/jobs/{job_id}/artifacts/cost.json").text)
    assert ledger["total_usd"] == pytest.approx(cost["total_usd"])


def http_get(url: str, path: str, **params) -> httpx.Response:
    response = httpx.get(url + path, params=params, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert response.status_code == 200, response.text
    return response


def test_report_metrics_and_artifacts_of_the_finished_job(service, client, jobs):
    job_id = wait_for_state(client, jobs["tiny"]["id"], TERMINAL_STATES, JOB_TIMEOUT_S)["id"]
    report = http_get(service, f"/v1/jobs/{job_id}/report").text
    assert report.count("data:image/png;base64,") >= 3  # submodel curves, fine-tune curve, cost bars
    assert "held-out loss" in report and "total" in report
    metrics = http_get(service, f"/v1/jobs/{job_id}/metrics", stage="finetune").json()
    assert metrics["count"] >= 2 and all(r["stage"] == "finetune" for r in metrics["data"])
    assert metrics["data"][-1]["eval_loss"] < metrics["data"][0]["eval_loss"]
    files = {a["path"] for a in http_get(service, f"/v1/jobs/{job_id}/artifacts").json()["data"]}
    assert {"spec.yaml", "cost.json", "metrics.jsonl", "report.png", "final/model.safetensors"} <= files
    exposition = http_get(service, "/metrics").text
    assert 'moedisco_jobs{owner="admin",state="succeeded"} 1.0' in exposition
    assert 'moedisco_stage_duration_seconds_count{stage="submodel"} 2.0' in exposition
    assert 'moedisco_spent_usd_total{owner="admin",tier="A100"}' in exposition


def test_budget_stops_the_job_at_a_stage_boundary(client, jobs):
    job = wait_for_state(client, jobs["budget"]["id"], TERMINAL_STATES, JOB_TIMEOUT_S)
    assert job["state"] == "failed" and "max_cost_usd" in job["reason"] and "budget" in job["reason"]
    started = {s["stage"] for s in job["stages"]}
    # prepare, on the priced CPU tier, spends the tiny budget: the job stops before the next stage.
    assert "prepare" in started and "submodel" not in started  # it stopped before spending more


def test_cancel_a_running_job_from_the_cli(service, client, jobs):
    job_id = jobs["cancel"]["id"]
    wait_until(lambda: client.job(job_id)["current_stage"] in ("submodel/0", "submodel/1"), JOB_TIMEOUT_S, 0.5,
               "the long job training")
    result = cli(service, "cancel", job_id)
    assert result.exit_code == 0 and "cancel requested" in result.output
    job = wait_for_state(client, job_id, TERMINAL_STATES, 120)
    assert job["state"] == "cancelled" and job["reason"].startswith("cancelled on request")
    assert [s["state"] for s in job["stages"] if s["stage"] == "submodel"][-1] == "stopped"


def test_cli_lists_and_prices_jobs(service, jobs):
    listed = cli(service, "jobs", "--state", "succeeded")
    assert listed.exit_code == 0 and jobs["tiny"]["id"] in listed.output and "of 1" in listed.output
    priced = cli(service, "cost", jobs["tiny"]["id"])
    assert priced.exit_code == 0 and "total" in priced.output and "wall time at each tier's price" in priced.output
    # No measured baseline: the job's FLOP estimate against the baseline's, never its wall-time bill against it.
    assert "FLOP model (no measured baseline): this job $" in " ".join(priced.output.split())
    missing = cli(service, "cost", "0123456789ab")
    assert missing.exit_code == 2 and "404" in missing.output


def test_submit_from_a_yaml_file(service, tmp_path, client):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(json.dumps(tiny_spec_dict("x", model=TWO_EXPERTS)))  # JSON is YAML
    result = cli(service, "submit", str(spec_file), "--set", "submodel.steps=0")
    assert result.exit_code == 2 and "submodel.steps" in result.output
    result = cli(service, "submit", str(spec_file), "--set", "name=from-cli", "--set", "max_cost_usd=1e-9")
    assert result.exit_code == 0, result.output
    job_id = result.output.split("submitted ")[1].split()[0]
    assert client.job(job_id)["name"] == "from-cli"
    client.cancel(job_id)


def test_resume_finishes_a_cancelled_job_training_only_what_was_left(service, client, jobs):
    job = wait_for_state(client, jobs["cancel"]["id"], TERMINAL_STATES, 120)
    assert job["state"] == "cancelled"
    markers = Path(job["output_dir"]) / "stages"
    done_before = {path.stem: path.read_text() for path in markers.glob("*.json")}
    interrupted = next(k for k in (0, 1) if f"submodel_{k}" not in done_before)  # stopped at a checkpoint
    result = cli(service, "resume", job["id"])
    assert result.exit_code == 0 and "queued again" in result.output, result.output
    job = wait_for_state(client, job["id"], TERMINAL_STATES, JOB_TIMEOUT_S)
    assert job["state"] == "succeeded", job["reason"]
    assert all((markers / f"{name}.json").read_text() == text for name, text in done_before.items())
    assert json.loads((markers / f"submodel_{interrupted}.json").read_text())["resumed_from"] > 0
    again = cli(service, "resume", job["id"])
    assert again.exit_code == 2 and "409" in again.output and "only a failed or cancelled" in again.output
