"""Extending and retiring through the service, over real HTTP: a user grows or shrinks only their own finished jobs
(named by id or folder) and models in their area or the shared one, another user's job reads as one that does not
exist, and `GET /v1/jobs/{id}/experts` and `moedisco experts` show each expert's provenance and the loss per domain.

    pytest tests/test_service_extend.py -q

Nothing trains here: a finished job is its folder as a run leaves it (spec.yaml, final/, stage summaries), made
from a tiny saved Qwen2-MoE, and its row in the store.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from moedisco.config.loading import build_spec
from moedisco.job.layout import JobPaths, mark_done
from moedisco.job.registry import plan
from moedisco.models.experts import set_provenance
from moedisco_cli.api_client import ApiClient
from moedisco_cli.main import app as cli
from service.core.config import Settings
from service.main import create_app
from service.store.store import Store
from tests.conftest import CORPUS, tiny_hf_config, tiny_spec_dict
from tests.helpers import LiveServer

TOKEN = "bootstrap-admin-token"
NO_SUCH_JOB = "0123456789ab"


def _provenance(job: str, experts: range, method: str = "moe_disco") -> list[dict]:
    return [{"job": job, "data": f"shared/{job}.jsonl", "cluster": k, "method": method} for k in experts]


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> Path:
    """A saved 4-expert Qwen2-MoE whose experts record the job that trained them."""
    folder = tmp_path_factory.mktemp("model")
    config = tiny_hf_config("qwen2_moe", 4)
    set_provenance(config, _provenance("base", range(4)))
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@dataclass
class Team:
    settings: Settings
    store: Store
    url: str
    admin: ApiClient
    ada: ApiClient
    bob: ApiClient
    model: Path

    def folder(self, job_id: str) -> Path:
        return self.settings.jobs_dir / job_id


@pytest.fixture(scope="module")
def team(tmp_path_factory, tiny_moe) -> Team:
    root = tmp_path_factory.mktemp("service")
    settings = Settings(data_dir=root / "data", database_url=f"sqlite:///{root / 'moedisco.db'}", api_token=TOKEN,
                        input_roots=[CORPUS.parent], runner="local", max_queued_jobs_per_user=None)
    app = create_app(settings, dispatch=False)
    with LiveServer(app) as url:
        admin = ApiClient(url, TOKEN)
        users = {}
        for name in ("ada", "bob"):
            admin.create_user(name)
            users[name] = ApiClient(url, admin.create_token(name)["token"])
        yield Team(app.state.settings, app.state.store, url, admin, users["ada"], users["bob"], tiny_moe)


def _extend(base: str) -> dict:
    return {**tiny_spec_dict("ignored"), "name": "ext", "method": "extend", "extend": {"base": base}}


def _retire(base: str, experts: list[int] | None = None) -> dict:
    return {"name": "ret", "method": "retire", "retire": {"base": base, "experts": experts or [1]}}


def _finish(team: Team, job_id: str, config=None) -> Path:
    """Job `job_id`'s folder as its run leaves it: spec.yaml, final/ (the tiny model, or only `config`), succeeded."""
    folder = team.folder(job_id)
    if config is None:
        shutil.copytree(team.model, folder / "final")
    else:
        config.save_pretrained(folder / "final")
    spec = team.admin.job(job_id)["spec"]
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    mark_done(JobPaths(folder), plan(build_spec(spec))[-1][-1].marker, {})  # its last stage's marker
    team.store.finish(job_id, "succeeded")
    return folder


def _finished_job(team: Team, client: ApiClient) -> str:
    job_id = client.submit(tiny_spec_dict("ignored"))["id"]
    _finish(team, job_id)
    return job_id


def _errors(response: httpx.Response) -> dict[str, str]:
    """A 422's messages by field."""
    assert response.status_code == 422, response.text
    return {".".join(map(str, error["loc"][1:])): error["msg"] for error in response.json()["detail"]}


def _submit(client: ApiClient, spec: dict) -> httpx.Response:
    return client.http.post("/v1/jobs", json=spec)


def test_a_user_extends_and_retires_their_own_job_named_by_id_or_folder(team):
    job = _finished_job(team, team.ada)
    final = str(team.folder(job) / "final")
    for base in (f"job:{job}", f"jobs/{job}", str(team.folder(job)), f"jobs/{job}/final"):
        extension = team.ada.job(team.ada.submit(_extend(base))["id"])["spec"]
        # The spec as run describes the base's model: its experts and one more, its tokenizer.
        assert extension["model"]["pretrained"] == final and extension["model"]["num_experts"] == 5, base
        assert extension["tokenizer"]["path"] == final
        retirement = team.ada.job(team.ada.submit(_retire(base, [0, 2]))["id"])["spec"]
        assert retirement["model"]["pretrained"] == final and retirement["model"]["num_experts"] == 2, base
    assert team.ada.job(team.ada.submit(_extend(f"job:{job}"))["id"])["spec"]["extend"]["base"] == str(
        team.folder(job))


def test_another_users_job_or_model_is_refused_as_if_it_did_not_exist(team):
    job = _finished_job(team, team.ada)
    data = team.settings.data_dir
    shutil.copytree(team.model, data / "users" / "ada" / "model")
    shutil.copytree(team.model, data / "shared" / "model", dirs_exist_ok=True)
    unknown = {"extend.base": _errors(_submit(team.bob, _extend(f"job:{NO_SUCH_JOB}"))),
               "retire.base": _errors(_submit(team.bob, _retire(f"jobs/{NO_SUCH_JOB}")))}
    assert set(unknown["extend.base"]) == {"extend.base"} and set(unknown["retire.base"]) == {"retire.base"}
    for base in (f"job:{job}", f"jobs/{job}", str(team.folder(job)), f"jobs/{job}/final", "users/ada/model",
                 "users/ada/no-such-model", "jobs", "moedisco.db"):
        assert _errors(_submit(team.bob, _extend(base))) == unknown["extend.base"], base
        assert _errors(_submit(team.bob, _retire(base))) == unknown["retire.base"], base
    for client in (team.ada, team.bob):  # the shared area is everyone's
        assert _submit(client, _retire("shared/model")).status_code == 201
    assert _submit(team.ada, _extend("users/ada/model")).status_code == 201
    for base in (f"job:{job}", "users/ada/model"):  # an admin uses any user's job or model
        assert _submit(team.admin, _extend(base)).status_code == 201
        assert _submit(team.admin, _retire(base)).status_code == 201


def test_a_base_that_is_no_finished_model_or_experts_it_lacks_name_the_field(team):
    area = team.settings.data_dir / "users" / "ada"
    (area / "empty").mkdir(parents=True, exist_ok=True)
    (area / "notes.txt").write_text("not a model")
    running = team.ada.submit(tiny_spec_dict("ignored"))["id"]
    team.folder(running).mkdir(parents=True)
    (team.folder(running) / "spec.yaml").write_text(yaml.safe_dump(team.ada.job(running)["spec"]))  # no final/ yet
    refused = {f"jobs/{running}": "no final/ model yet", "users/ada/empty": "no config.json",
               "users/ada/notes.txt": "must be a folder", "job:123": "12 hex digits"}
    for base, message in refused.items():
        for spec, field in ((_extend(base), "extend.base"), (_retire(base), "retire.base")):
            errors = _errors(_submit(team.ada, spec))
            assert list(errors) == [field] and message in errors[field], (base, errors)
    job = _finished_job(team, team.ada)
    for experts in ([4], [0, 1, 2, 3]):  # an expert the base lacks; none left
        errors = _errors(_submit(team.ada, _retire(f"job:{job}", experts)))
        assert list(errors) == ["retire.experts"] and "experts 0-3" in errors["retire.experts"]


@pytest.fixture(scope="module")
def extended(team) -> tuple[str, str, str]:
    """(base job, its extension, a retirement of the extension's expert 1): ada's, finished as their runs leave them."""
    base = _finished_job(team, team.ada)
    extension = team.ada.submit(_extend(f"job:{base}"))["id"]
    config = tiny_hf_config("qwen2_moe", 5)
    set_provenance(config, _provenance("base", range(4)) + _provenance("ext", range(1), method="extend"))
    _finish(team, extension, config)
    mark_done(JobPaths(team.folder(extension)), "finetune", {
        "domains": {"base/cluster 0": 2.5, "ext/cluster 0": 1.5}, "domains_base": {"base/cluster 0": 2.0}})
    retirement = team.ada.submit(_retire(f"job:{extension}", [1]))["id"]
    config = tiny_hf_config("qwen2_moe", 4)
    set_provenance(config, [entry for k, entry in enumerate(_provenance("base", range(4))) if k != 1]
                   + _provenance("ext", range(1), method="extend"))
    _finish(team, retirement, config)
    mark_done(JobPaths(team.folder(retirement)), "retire", {
        "domains": [{"domain": "base/cluster 1", "before": 2.0, "after": 3.0, "change": 1.0}],
        "retired_provenance": [{**_provenance("base", range(4))[1], "expert": 1}]})
    return base, extension, retirement


def test_the_experts_of_an_extension_and_a_retirement(team, extended):
    base, extension, retirement = extended
    view = team.ada.experts(extension)
    assert view["method"] == "extend" and view["base"] == str(team.folder(base))
    assert [(e["expert"], e["job"], e["method"]) for e in view["experts"]] == [
        (0, "base", "moe_disco"), (1, "base", "moe_disco"), (2, "base", "moe_disco"), (3, "base", "moe_disco"),
        (4, "ext", "extend")]
    assert view["domains_stage"] == "finetune" and view["domains"] == [
        {"domain": "base/cluster 0", "before": 2.0, "after": 2.5, "change": 0.5},
        {"domain": "ext/cluster 0", "before": None, "after": 1.5, "change": None}]
    view = team.ada.experts(retirement)
    assert [e["cluster"] for e in view["experts"]] == [0, 2, 3, 0] and view["retired"][0]["cluster"] == 1
    assert view["domains_stage"] == "retire" and view["domains"][0]["change"] == 1.0
    assert team.admin.experts(extension) == team.ada.experts(extension)
    plain = team.ada.experts(base)  # a moe_disco job: the provenance alone
    assert plain["method"] == "moe_disco" and plain["domains"] == [] and len(plain["experts"]) == 4


def test_the_experts_view_is_the_owners_and_reads_only_the_jobs_own_final_model(team, extended):
    _, extension, _ = extended
    for job_id in (extension, NO_SUCH_JOB):  # another's job is a job that does not exist
        response = team.bob.http.get(f"/v1/jobs/{job_id}/experts")
        assert response.status_code == 404 and response.json() == {"detail": f"no job {job_id!r}"}
    queued = team.ada.submit(_extend(f"job:{extended[0]}"))["id"]
    response = team.ada.http.get(f"/v1/jobs/{queued}/experts")
    assert response.status_code == 404 and "no final model yet" in response.text
    # A final/config.json leading out of the job's folder (into bob's job) is not read.
    bobs = _finished_job(team, team.bob)
    (team.folder(queued) / "final").mkdir(parents=True)
    (team.folder(queued) / "final" / "config.json").symlink_to(team.folder(bobs) / "final" / "config.json")
    assert team.ada.http.get(f"/v1/jobs/{queued}/experts").status_code == 404
    (team.folder(queued) / "final" / "config.json").unlink()
    (team.folder(queued) / "final" / "config.json").write_text("{}")  # there, but no model's
    response = team.ada.http.get(f"/v1/jobs/{queued}/experts")
    assert response.status_code == 409 and "no MoE model's config" in response.text


def _cli(team: Team, *args: str):
    token = team.ada.http.headers["Authorization"].removeprefix("Bearer ")
    return CliRunner().invoke(cli, list(args), env={"MOEDISCO_API_URL": team.url, "MOEDISCO_API_TOKEN": token,
                                                    "COLUMNS": "200"})


def test_moedisco_experts_from_the_service_and_from_a_folder(team, extended):
    base, extension, retirement = extended
    shown = _cli(team, "experts", extension)
    assert shown.exit_code == 0, shown.output
    assert "extend" in shown.output and "+0.5000" in shown.output and "ext/cluster 0" in shown.output
    remote = json.loads(_cli(team, "experts", extension, "--json").output)
    local = json.loads(_cli(team, "experts", "--local", str(team.folder(extension)), "--json").output)
    assert local == {**remote, "job_id": None}
    retired = _cli(team, "experts", "--local", str(team.folder(retirement)))
    assert retired.exit_code == 0 and "retired experts" in retired.output and "+1.0000" in retired.output
    model = json.loads(_cli(team, "experts", "--local", str(team.model), "--json").output)
    assert model["method"] is None and [e["job"] for e in model["experts"]] == ["base"] * 4
    status = _cli(team, "status", extension)
    assert status.exit_code == 0 and "extends" in status.output and base in status.output
    assert _cli(team, "experts").exit_code == 2  # neither a job id nor --local
    assert _cli(team, "experts", "--local", str(team.settings.data_dir)).exit_code == 2
    assert _cli(team, "experts", NO_SUCH_JOB).exit_code == 2  # the API's 404


def test_a_job_folder_written_into_a_users_area_cannot_lead_to_another_users_job(team):
    """A spec.yaml bob writes into his own area, naming ada's job as the base it extended: extending or retiring it
    would replay and measure ada's corpus, so the submission is refused at the base, and ada's own is accepted."""
    adas = _finished_job(team, team.ada)
    fake = team.settings.data_dir / "users" / "bob" / "fake"
    shutil.copytree(team.model, fake / "final")
    spec = {**_extend(str(team.folder(adas))), "output_dir": str(fake)}
    (fake / "spec.yaml").write_text(yaml.safe_dump(build_spec(spec).model_dump(mode="json")))
    mark_done(JobPaths(fake), plan(build_spec(spec))[-1][-1].marker, {})
    for submitted, field in ((_extend("users/bob/fake"), "extend.base"), (_retire("users/bob/fake"), "retire.base")):
        errors = _errors(_submit(team.bob, submitted))
        assert list(errors) == [field] and "made from a job outside what you may read" in errors[field]
    assert _submit(team.admin, _retire("users/bob/fake")).status_code == 201  # an admin reads both
    for garbage in ("[", "- a list\n", ""):  # a spec.yaml of one's own that does not load: a 422, never a 500
        (fake / "spec.yaml").write_text(garbage)
        errors = _errors(_submit(team.bob, _extend("users/bob/fake")))
        assert list(errors) == ["extend.base"] and "cannot be followed" in errors["extend.base"], garbage


def test_a_pretrained_checkpoint_gives_the_job_its_architecture(team):
    """`model.arch` left out is the checkpoint's in the job as stored; one that contradicts it is a 422 there."""
    folder = team.settings.data_dir / "users" / "ada" / "mixtral"
    AutoModelForCausalLM.from_config(tiny_hf_config("mixtral", 4)).save_pretrained(folder)
    model = {"pretrained": "users/ada/mixtral", "num_experts": 4}
    stored = team.ada.job(team.ada.submit({**tiny_spec_dict("ignored"), "model": model})["id"])["spec"]
    assert stored["model"]["arch"] == "mixtral"
    refused = _errors(_submit(team.ada, {**tiny_spec_dict("ignored"), "model": {**model, "arch": "olmoe"}}))
    assert "is a mixtral checkpoint" in refused["model.arch"]
