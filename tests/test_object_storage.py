"""Object storage against a real S3 API on loopback (moto's server, not a mock of the client): the corpus read from
s3://, the job folder written there, results equal to the local-disk run's, a resume from the bucket alone."""

from __future__ import annotations

import re
import shutil
import socket

import moto.server as moto_server  # the dev extra: a real S3 API on loopback
import numpy as np
import pytest

from moedisco.config.loading import build_spec
from moedisco.config.spec import DataConfig
from moedisco.io.documents import DataError, iter_documents
from moedisco.job.layout import JobPaths, is_done
from moedisco.runner.job_runner import JobRunner, LocalExecutor
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
    """The Ray runner's data stages for a corpus of one shard (`ray_cluster.data.data_worker.DataWorker`'s work,
    without starting Ray) write their Parquet shards to an s3:// `resources.storage_path` and give the clusters
    the local runner gives."""
    from moedisco.job.metrics import MetricsWriter
    from moedisco.job.registry import Task
    from moedisco.stages.cluster import stage_cluster
    from moedisco.stages.embed import Embedder, stage_embed
    from moedisco.stages.prepare import stage_prepare
    from moedisco.stages.stage_run import StageRun
    from ray_cluster.data.embed_cluster import cluster_in_process, embed_in_process
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
    assert {key.split("/")[2] for key in keys} - {""} == {"corpus", "embeddings"}  # "": a folder marker
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


def _spec_on_s3(s3, tmp_path, **sections):
    """A job folder of its own in the bucket (moto's server keeps its buckets for the whole test session)."""
    _, s3_glob = _upload_corpus(s3, tmp_path, lines=40)
    data = {"train": s3_glob, "max_documents": None}
    return build_spec(tiny_spec_dict(f"s3://{BUCKET}/jobs/{tmp_path.name}", data=data, **sections))


def _runner(spec, stages: int, **kwargs) -> JobRunner:
    runner = JobRunner(spec, LocalExecutor(progress=False), **kwargs)
    runner.plan = runner.plan[:stages]
    return runner


def test_a_resume_from_the_bucket_keeps_the_ledger_and_skips_finished_stages(s3, tmp_path):
    from moedisco.job.events import StageSkipped

    spec = _spec_on_s3(s3, tmp_path)
    _runner(spec, 2).run()  # prepare, embed (priced)
    spent = JobRunner(spec, LocalExecutor(progress=False)).ledger.summary()["stages"]
    assert spent
    shutil.rmtree(JobPaths(spec.output_dir).root)  # a fresh machine
    events = []
    runner = _runner(spec, 2, events=events.append)
    assert runner.ledger.summary()["stages"] == spent  # read after the pull, not before it
    summary = runner.run()
    assert [type(event) for event in events] == [StageSkipped, StageSkipped]
    assert summary["cost"]["stages"] == spent


def _fail_at(stage: str, error: Exception, paths: JobPaths, break_push: bool = False):
    """The events callback: as `stage` starts, a file appears (a checkpoint written during it), then it fails."""
    from moedisco.job.events import StageStarted

    def events(event) -> None:
        if isinstance(event, StageStarted) and event.stage == stage:
            (paths.root / "runs").mkdir(exist_ok=True)
            (paths.root / "runs" / "checkpoint.txt").write_text("step 3")
            if break_push:  # the push record cannot be replaced: the push after the failure fails too
                (paths.root / ".pushed.json").unlink()
                (paths.root / ".pushed.json").mkdir()
            raise error
    return events


@pytest.mark.parametrize("case", ["failure", "claim_lost", "push_fails"])
def test_a_stopped_job_pushes_what_it_wrote_unless_another_runner_owns_the_folder(s3, tmp_path, case):
    from moedisco.job.layout import ClaimLost

    spec = _spec_on_s3(s3, tmp_path)
    paths = JobPaths(spec.output_dir)
    error = ClaimLost("taken over") if case == "claim_lost" else RuntimeError("node lost")
    runner = _runner(spec, 2, events=_fail_at("embed", error, paths, break_push=case == "push_fails"))
    with pytest.raises(type(error), match=str(error)):  # the original error, whatever the push did
        runner.run()
    prefix = f"jobs/{tmp_path.name}/"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]}
    assert f"{prefix}stages/prepare.json" in keys  # pushed as prepare finished
    if case != "push_fails":  # there the copy may land before the record write fails; the error is what counts
        assert (f"{prefix}runs/checkpoint.txt" in keys) == (case == "failure")


def test_push_skips_vanished_files_and_pulling_pieces_and_records_atomically(s3, tmp_path, monkeypatch):
    import json

    from moedisco.io import staging

    local = tmp_path / "job"
    (local / "checkpoints").mkdir(parents=True)
    (local / "keep.json").write_text("{}")
    (local / "checkpoints" / "step_1").write_text("old")
    (local / ".half.bin.pulling").write_text("partial pull")
    listing = staging._local_files

    def rotate_after_listing(folder):  # a checkpoint rotated away between the listing and its copy
        files = listing(folder)
        (folder / "checkpoints" / "step_1").unlink()
        return files

    monkeypatch.setattr(staging, "_local_files", rotate_after_listing)
    assert staging.push(local, f"s3://{BUCKET}/{tmp_path.name}") == 1
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{tmp_path.name}/")["Contents"]}
    assert keys == {f"{tmp_path.name}/keep.json"}
    assert set(json.loads((local / staging.PUSHED).read_text())) == {"keep.json"}
    assert not list(local.glob(".*.partial"))


def test_pull_brings_down_an_object_rewritten_at_the_same_size(s3, tmp_path):
    import time

    from moedisco.io import staging

    uri, local = f"s3://{BUCKET}/{tmp_path.name}", tmp_path / "job"
    (local / "stages").mkdir(parents=True)
    (local / "stages" / "a.json").write_text('{"v": 1}')
    staging.push(local, uri)
    assert staging.pull(uri, local) == 0  # what we pushed ourselves is current
    time.sleep(1.1)  # S3 stamps objects to the second
    s3.put_object(Bucket=BUCKET, Key=f"{tmp_path.name}/stages/a.json", Body=b'{"v": 2}')  # another machine, same length
    assert staging.pull(uri, local) == 1
    assert (local / "stages" / "a.json").read_text() == '{"v": 2}'
    assert staging.pull(uri, local) == 0
    (local / staging.PUSHED).unlink()  # no record: size and mtime decide, and the pulled file has the object's
    assert staging.pull(uri, local) == 0
    time.sleep(1.1)
    s3.put_object(Bucket=BUCKET, Key=f"{tmp_path.name}/stages/a.json", Body=b'{"v": 3}')
    assert staging.pull(uri, local) == 1
    assert (local / "stages" / "a.json").read_text() == '{"v": 3}'


def test_pull_removes_what_the_bucket_lost_but_keeps_local_work_and_stays_in_its_folder(s3, tmp_path):
    from moedisco.io import staging, storage

    uri, local = f"s3://{BUCKET}/{tmp_path.name}", tmp_path / "job"
    (local / "stages").mkdir(parents=True)
    for name in ("merge.json", "submodel_0.json"):
        (local / "stages" / name).write_text("{}")
    staging.push(local, uri)
    (local / "stages" / "finetune.json").write_text("{}")  # work of this machine, not pushed yet
    # another machine re-ran from the submodels: the merge marker is gone from the bucket
    s3.delete_object(Bucket=BUCKET, Key=f"{tmp_path.name}/stages/merge.json")
    assert staging.pull(uri, local) == 0
    assert sorted(p.name for p in (local / "stages").iterdir()) == ["finetune.json", "submodel_0.json"]
    staging.push(local, uri)  # the record forgot the merge marker: nothing to delete, the new marker goes up
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{tmp_path.name}/")["Contents"]}
    assert keys == {f"{tmp_path.name}/stages/{n}" for n in ("finetune.json", "submodel_0.json")}
    s3.put_object(Bucket=BUCKET, Key=f"{tmp_path.name}/stages/../../escape.json", Body=b"{}")
    with pytest.raises(storage.StorageError, match="outside the staging folder"):
        staging.pull(uri, local)
    assert not (tmp_path.parent / "escape.json").exists()


def test_sequential_reads_stream_and_parquet_seeks(s3, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moedisco.io import storage

    s3.put_object(Bucket=BUCKET, Key="t/a.jsonl", Body=b'{"text": "a"}\n')
    with storage.open_input(f"s3://{BUCKET}/t/a.jsonl") as handle:
        assert not handle.seekable()  # read ahead, not one ranged GET per line
        assert handle.read() == b'{"text": "a"}\n'
    with storage.open_input(f"s3://{BUCKET}/t/a.jsonl", seekable=True) as handle:
        assert handle.seekable()
    pq.write_table(pa.table({"text": ["one", "two"]}), tmp_path / "c.parquet")
    s3.put_object(Bucket=BUCKET, Key="t/c.parquet", Body=(tmp_path / "c.parquet").read_bytes())
    cfg = DataConfig(train=f"s3://{BUCKET}/t/c.parquet")
    assert list(iter_documents(cfg.train, cfg)) == ["one", "two"]


def test_a_local_disk_error_in_a_pull_names_the_staging_folder_not_credentials(s3, tmp_path):
    from moedisco.io import staging

    s3.put_object(Bucket=BUCKET, Key="l/stages/a.json", Body=b"{}")
    blocker = tmp_path / "job"
    blocker.mkdir()
    (blocker / "stages").write_text("a file where the folder goes")
    with pytest.raises(staging.StagingError, match="local staging folder") as raised:
        staging.pull(f"s3://{BUCKET}/l", blocker)
    assert "AWS_ACCESS_KEY_ID" not in str(raised.value)


def test_an_s3_output_dir_under_ray_needs_every_node_on_the_drivers_machine():
    from ray_cluster.placement import check_output_dir

    spec = build_spec(tiny_spec_dict(f"s3://{BUCKET}/jobs/tiny"))
    check_output_dir(spec, ["10.0.0.1", "10.0.0.1"], "10.0.0.1")  # a simulated cluster: one machine
    with pytest.raises(ValueError, match=r"output_dir s3://.*10\.0\.0\.2.*resources\.storage_path"):
        check_output_dir(spec, ["10.0.0.1", "10.0.0.2"], "10.0.0.1")
    check_output_dir(build_spec(tiny_spec_dict("/shared/jobs/tiny")), ["10.0.0.1", "10.0.0.2"], "10.0.0.1")
