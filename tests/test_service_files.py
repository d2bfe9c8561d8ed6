"""Uploads over real HTTP: streamed, checked as a corpus, within the upload limit and the user's quota, in the
user's own area (readable by their jobs only), nothing left of a refused one; the shared area is the admins'.

    pytest tests/test_service_files.py -q
"""

from __future__ import annotations

import httpx
import pytest
from typer.testing import CliRunner

from moedisco_cli.api_client import ApiClient, ApiError
from service.core.config import Settings
from service.main import create_app
from tests.conftest import CORPUS, tiny_spec_dict
from tests.helpers import LiveServer

TOKEN = "bootstrap-admin-token"
QUOTA = 3 * CORPUS.stat().st_size // 2  # room for one copy of the corpus, not two


@pytest.fixture
def team(tmp_path):
    """(settings, url, admin, ada, bob): API clients over a live server with a small quota."""
    settings = Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'data' / 'moedisco.db'}",
                        api_token=TOKEN, runner="local", max_upload_bytes=2 * CORPUS.stat().st_size,
                        user_quota_bytes=QUOTA)
    with LiveServer(create_app(settings, dispatch=False)) as url:
        admin = ApiClient(url, TOKEN)
        clients = {}
        for name in ("ada", "bob"):
            admin.create_user(name)
            clients[name] = ApiClient(url, admin.create_token(name)["token"])
        yield settings, url, admin, clients["ada"], clients["bob"]


def _leftovers(settings: Settings) -> list[str]:
    return sorted(str(path.relative_to(settings.data_dir)) for path in (settings.data_dir / "users").rglob("*")
                  if path.is_file()) if (settings.data_dir / "users").is_dir() else []


def _submit(client: ApiClient, train: str) -> dict:
    return client.submit(tiny_spec_dict("ignored", data={"train": train}))


def test_an_upload_is_its_owners_to_train_on(team):
    settings, url, admin, ada, bob = team
    stored = ada.upload(CORPUS, name="c.jsonl")
    assert stored["path"] == "users/ada/uploads/c.jsonl" and stored["size"] == CORPUS.stat().st_size
    assert (settings.data_dir / stored["path"]).read_bytes() == CORPUS.read_bytes()
    assert [f["name"] for f in ada.files()] == ["c.jsonl"] and bob.files() == []
    assert _submit(ada, stored["path"])["state"] == "queued"
    with pytest.raises(ApiError) as refused:
        _submit(bob, stored["path"])
    assert refused.value.status_code == 422 and "data.train" in str(refused.value)
    with pytest.raises(ApiError) as again:
        ada.upload(CORPUS, name="c.jsonl")
    assert again.value.status_code == 409
    ada.delete_file("c.jsonl")
    assert ada.files() == [] and _leftovers(settings) == []
    with pytest.raises(ApiError) as gone:
        _submit(ada, stored["path"])
    assert gone.value.status_code == 422 and "does not exist" in str(gone.value)


def test_a_file_that_is_not_a_corpus_is_refused_naming_it_and_leaves_nothing(team, tmp_path):
    settings, url, admin, ada, bob = team
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "unterminated\n')
    with pytest.raises(ApiError) as refused:
        ada.upload(broken)
    assert refused.value.status_code == 422 and "broken.jsonl" in str(refused.value) and ":2" in str(refused.value)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ApiError, match="no documents"):
        ada.upload(empty)
    assert _leftovers(settings) == []


@pytest.mark.parametrize("name", ["../escape.jsonl", ".hidden.jsonl", "corpus.exe", "a/b.jsonl", "x" * 200 + ".txt"])
def test_a_bad_name_is_refused(team, name):
    settings, url, admin, ada, bob = team
    response = httpx.post(f"{url}/v1/files", params={"name": name}, content=b'{"text": "x"}\n',
                          headers={"Authorization": f"Bearer {ada.http.headers['Authorization'][7:]}"})
    assert response.status_code in (404, 422), response.text
    assert _leftovers(settings) == [] and not (settings.data_dir / "escape.jsonl").exists()


def test_the_upload_limit_and_the_quota_hold_while_the_body_streams(team, tmp_path):
    settings, url, admin, ada, bob = team
    token = ada.http.headers["Authorization"]

    def chunks(total: int):  # no Content-Length: only counting what arrives can stop it
        line = b'{"text": "' + b"y" * 1000 + b'"}\n'
        for _ in range(total // len(line) + 1):
            yield line

    too_big = httpx.post(f"{url}/v1/files", params={"name": "big.jsonl"}, content=chunks(settings.max_upload_bytes * 2),
                         headers={"Authorization": token}, timeout=60)
    assert too_big.status_code == 413, too_big.text
    ada.upload(CORPUS, name="first.jsonl")
    over_quota = httpx.post(f"{url}/v1/files", params={"name": "second.jsonl"}, content=chunks(QUOTA),
                            headers={"Authorization": token}, timeout=60)
    assert over_quota.status_code == 413 and "left" in over_quota.text
    with pytest.raises(ApiError) as declared:  # a Content-Length past the quota left: refused before it is read
        ada.upload(CORPUS, name="third.jsonl")
    assert declared.value.status_code == 413
    assert _leftovers(settings) == ["users/ada/uploads/first.jsonl"]
    assert bob.upload(CORPUS, name="first.jsonl")["path"] == "users/bob/uploads/first.jsonl"  # quotas are per user


def test_the_shared_area_is_written_by_admins_and_read_by_everyone(team):
    settings, url, admin, ada, bob = team
    with pytest.raises(ApiError) as forbidden:
        ada.upload(CORPUS, name="c.jsonl", shared=True)
    assert forbidden.value.status_code == 403
    stored = admin.upload(CORPUS, name="c.jsonl", shared=True)
    assert stored["path"] == "shared/c.jsonl" and [f["path"] for f in bob.files(shared=True)] == ["shared/c.jsonl"]
    assert _submit(bob, stored["path"])["state"] == "queued" and _submit(ada, stored["path"])["state"] == "queued"
    with pytest.raises(ApiError) as no_delete:
        bob.delete_file("c.jsonl", shared=True)
    assert no_delete.value.status_code == 403


def test_moedisco_upload(team, monkeypatch):
    from moedisco_cli.main import app as cli

    settings, url, admin, ada, bob = team
    monkeypatch.setenv("MOEDISCO_API_URL", url)
    monkeypatch.setenv("MOEDISCO_API_TOKEN", ada.http.headers["Authorization"][7:])
    result = CliRunner().invoke(cli, ["upload", str(CORPUS), "--name", "mine.jsonl"])
    assert result.exit_code == 0 and "users/ada/uploads/mine.jsonl" in result.output, result.output
    listed = CliRunner().invoke(cli, ["files", "list"])
    assert "users/ada/uploads/mine.jsonl" in listed.output
    assert CliRunner().invoke(cli, ["files", "rm", "mine.jsonl"]).exit_code == 0 and ada.files() == []


def test_parallel_uploads_share_the_quota(team):
    """Two uploads at once, each within the quota left when it began: together they may not pass it."""
    import threading
    import time

    settings, url, admin, ada, bob = team
    body, gate, answers = CORPUS.read_bytes(), threading.Event(), {}

    def paused():  # the first upload's partial sits there, half written, while the second one runs
        yield body[: len(body) // 2]
        gate.wait(30)
        yield body[len(body) // 2:]

    def first():
        answers["first"] = httpx.post(f"{url}/v1/files", params={"name": "first.jsonl"}, content=paused(),
                                      headers={"Authorization": ada.http.headers["Authorization"]}, timeout=60)

    thread = threading.Thread(target=first)
    thread.start()
    uploads = settings.data_dir / "users" / "ada" / "uploads"
    deadline = time.monotonic() + 30
    while not any(p.name.endswith(".partial") and p.stat().st_size for p in uploads.glob(".*")):
        assert time.monotonic() < deadline, "the first upload never started"
        time.sleep(0.05)
    try:
        answers["second"] = ada.upload(CORPUS, name="second.jsonl")
    except ApiError as error:
        answers["second"] = error
    gate.set()
    thread.join(60)
    kept = sum(path.stat().st_size for path in uploads.iterdir())
    assert kept <= QUOTA and any(isinstance(a, ApiError) or getattr(a, "status_code", 0) == 413
                                 for a in answers.values()), answers


def test_a_parquet_that_would_expand_past_the_limit_is_refused_unread(team, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from service.api.routes import files

    settings, url, admin, ada, bob = team
    monkeypatch.setattr(files, "MAX_ROW_GROUP_BYTES", 1 << 20)
    bomb = tmp_path / "bomb.parquet"
    pq.write_table(pa.table({"text": [f"{i}" + "a" * (1 << 18) for i in range(8)]}), bomb, compression="zstd")
    assert bomb.stat().st_size < 64 << 10
    with pytest.raises(ApiError, match="row group") as refused:
        ada.upload(bomb)
    assert refused.value.status_code == 422 and _leftovers(settings) == []
