"""Object storage against a real S3 API on loopback (moto's server, not a mock of the client): the corpus read from
s3://, the job folder written there, results equal to the local-disk run's, a resume from the bucket alone."""

from __future__ import annotations

import re
import shutil
import socket

import moto.server as moto_server  # the dev extra: a real S3 API on loopback
import numpy as np
import pytest

from moedisco.data import DataError, iter_documents
from moedisco.config import DataConfig
from moedisco.layout import JobPaths, is_done
from moedisco.runner import JobRunner, LocalExecutor
from moedisco.spec_loading import build_spec
from tests.conftest import CORPUS, tiny_spec_dict

BUCKET = "corpora"
DATA_STAGES = 3  # prepare, embed, cluster: the plan's first groups


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """An S3 endpoint on a free loopback port, with a bucket, and the credentials a user would set."""
    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
                        "AWS_ENDPOINT_URL": endpoint, "MOEDISCO_STAGING_DIR": str(tmp_path / "staging")}.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    yield client
    server.stop()


def _upload_corpus(client, tmp_path, lines: int = 80) -> tuple:
    """The bundled corpus's first lines as two JSONL parts, on disk and in the bucket."""
    rows = CORPUS.read_text().splitlines()[:lines]
    local = tmp_path / "corpus"
    local.mkdir()
    for part, chunk in enumerate((rows[: lines // 2], rows[lines // 2 :])):
        body = "\n".join(chunk) + "\n"
        (local / f"part-{part}.jsonl").write_text(body)
        client.put_object(Bucket=BUCKET, Key=f"corpus/part-{part}.jsonl", Body=body.encode())
    return str(local / "part-*.jsonl"), f"s3://{BUCKET}/corpus/part-*.jsonl"


def _run_data_stages(spec) -> None:
    runner = JobRunner(spec, LocalExecutor(progress=False))
    runner.plan = runner.plan[:DATA_STAGES]
    runner.run()


OUTPUTS = ("data/train_tokens/tokens.bin", "data/train_tokens/offsets.npy", "data/eval_tokens/tokens.bin",
           "data/tokenizer/tokenizer.json", "embed/embeddings.npy", "cluster/assignments.npy",
           *(f"cluster/tokens_{k}/tokens.bin" for k in range(4)))


def test_data_stages_read_and_write_s3_as_they_do_local_disk(s3, tmp_path):
    local_glob, s3_glob = _upload_corpus(s3, tmp_path)
    uri = f"s3://{BUCKET}/jobs/tiny"
    local_spec = build_spec(tiny_spec_dict(tmp_path / "local", data={"train": local_glob, "max_documents": None}))
    s3_spec = build_spec(tiny_spec_dict(uri, data={"train": s3_glob, "max_documents": None}))
    _run_data_stages(local_spec)
    _run_data_stages(s3_spec)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="jobs/tiny/")["Contents"]}
    assert {f"jobs/tiny/{name}" for name in OUTPUTS} <= keys
    assert not any(".partial" in key for key in keys)
    # a fresh machine: nothing staged locally, the job folder comes down from the bucket and every stage is done
    staged = JobPaths(uri).root
    shutil.rmtree(staged)
    _run_data_stages(s3_spec)
    assert all(is_done(JobPaths(uri), stage) for stage in ("prepare", "embed", "cluster"))
    local = JobPaths(local_spec.output_dir).root
    for name in OUTPUTS:
        ours, theirs = (staged / name).read_bytes(), (local / name).read_bytes()
        if name.endswith("embeddings.npy"):  # the same vectors; float sums may differ in the last bit by thread
            assert np.allclose(np.load(staged / name), np.load(local / name), atol=1e-6), name
        else:
            assert ours == theirs, name


def test_ray_runners_data_shards_on_an_s3_storage_path(s3, tmp_path):
    """The Ray runner's data stages for a corpus of one shard (`ray_cluster.prestart.DataWorker`'s work, here
    without starting Ray) write their Parquet shards to an s3:// `resources.storage_path` and give the clusters
    the local runner gives."""
    from moedisco.corpus import stage_prepare, stage_cluster, stage_embed
    from moedisco.embed import Embedder
    from moedisco.metrics import MetricsWriter
    from moedisco.stage_run import StageRun
    from moedisco.stages import Task
    from ray_cluster.data import cluster_in_process, embed_in_process
    from ray_cluster.placement import job_key

    local, s3_glob = _upload_corpus(s3, tmp_path)
    spec = build_spec(tiny_spec_dict(tmp_path / "ray", data={"train": s3_glob, "max_documents": None},
                                     resources={"storage_path": f"s3://{BUCKET}/ray"}))
    paths = JobPaths(spec.output_dir)
    run = StageRun(spec, paths, MetricsWriter(paths.metrics), Task("prepare"), progress=False)
    stage_prepare(run)
    embed_in_process(spec, paths, Embedder(spec.embed))
    ray_sizes = cluster_in_process(spec, paths)["sizes"]
    ray_assignments = np.load(paths.clusters / "assignments.npy")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"ray/{job_key(spec)}/")["Contents"]}
    assert {key.split("/")[2] for key in keys} - {""} == {"corpus", "embeddings", "clusters"}  # "": a folder marker
    assert {key.split("/")[3] for key in keys if "/clusters/cluster=" in key} == {f"cluster={k}" for k in range(4)}
    stage_embed(run)
    assert stage_cluster(run)["sizes"] == ray_sizes  # the local runner's stages on the same split
    assert np.array_equal(np.load(paths.clusters / "assignments.npy"), ray_assignments)


def test_wrong_credentials_and_missing_objects_are_named(s3, monkeypatch):
    from moto import settings

    cfg = DataConfig(train=f"s3://{BUCKET}/nothing/*.jsonl")
    with pytest.raises(DataError, match=re.escape(f"s3://{BUCKET}/nothing/*.jsonl: no object")):
        list(iter_documents(cfg.train, cfg))
    s3.put_object(Bucket=BUCKET, Key="c.jsonl", Body=b'{"text": "a"}\n')
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server now checks keys, as S3 does
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unknown")
    cfg = DataConfig(train=f"s3://{BUCKET}/c.jsonl")
    with pytest.raises(DataError, match=rf"s3://{BUCKET}/c.jsonl: .*AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY"):
        list(iter_documents(cfg.train, cfg))
