"""Object-storage URIs in a job spec sent to the service: where the engine reads them, under
MOEDISCO_STORAGE_ROOTS, and nothing that could lead the server's credentials elsewhere.

    pytest tests/test_service_uris.py -q
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.core.config import Settings
from service.main import create_app
from tests.test_service_api import AUTH, spec
from tests.test_service_api import settings as api_settings

settings = api_settings  # the API tests' fixture, under its own name: the tests here take `settings`


def test_object_storage_uris_are_accepted_where_the_engine_reads_them_under_the_storage_roots(settings):
    raw = spec(data={"train": "s3://corpora/corpus/*.jsonl"}, resources={"storage_path": "s3://ckpt/ray"})
    with TestClient(create_app(settings, dispatch=False), headers=AUTH) as client:
        response = client.post("/v1/jobs", json=raw)
    assert response.status_code == 422, response.text
    assert {tuple(e["loc"]) for e in response.json()["detail"]} == {("body", "data", "train"),
                                                                   ("body", "resources", "storage_path")}
    assert all("MOEDISCO_STORAGE_ROOTS" in e["msg"] for e in response.json()["detail"])
    allowed = settings.model_copy(update={"storage_roots": ["s3://corpora/corpus", "s3://ckpt"]})
    with TestClient(create_app(allowed, dispatch=False), headers=AUTH) as client:
        response = client.post("/v1/jobs", json=raw)
        assert response.status_code == 201, response.text
        response = client.post("/v1/jobs", json=spec(tokenizer={"path": "s3://ckpt/tok"}))
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "tokenizer", "path"]


ESCAPES = ["gs://ckpt/ray?endpoint_override=attacker:80&scheme=http",  # pyarrow would send the credentials there
           "s3://ckpt/ray#x", "s3://key:secret@ckpt/ray", "s3://ckpt:9000/ray", "s3://ckpt/ray/../../other",
           "s3://ckpt/ray/%2e%2e/other", "s3://ckpt//ray", "s3://ckptx/ray", "s3://ckpt/rayx"]


@pytest.mark.parametrize("value", ESCAPES)
def test_a_uri_that_could_leave_the_storage_roots_is_refused(settings, value):
    allowed = settings.model_copy(update={"storage_roots": ["s3://ckpt/ray", "gs://ckpt/ray"]})
    with TestClient(create_app(allowed, dispatch=False), headers=AUTH) as client:
        response = client.post("/v1/jobs", json=spec(resources={"storage_path": value}))
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "resources", "storage_path"]


def test_storage_roots_must_be_bucket_prefixes(tmp_path):
    for bad in ("s3://", "s3:///key", "s3://bucket/a/../b", "s3://b?endpoint_override=x", "/local/folder"):
        with pytest.raises(ValueError, match="MOEDISCO_STORAGE_ROOTS entry"):
            Settings(data_dir=tmp_path, storage_roots=[bad])
    assert Settings(data_dir=tmp_path, storage_roots=["gcs://bucket/a"]).storage_roots == ["gcs://bucket/a"]
