"""Declared domains (`cluster.method: field`) and one-cluster jobs: their clusters come from a document field, or
are the whole corpus, with nothing embedded; on the local runner and through the Ray runner's cluster stage."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moedisco.config.loading import build_spec
from moedisco.config.spec import DataConfig
from moedisco.io.documents import DataError, DomainField, ReadReport, iter_records, iter_texts
from moedisco.io.token_shards import TokenShard
from moedisco.job.layout import JobPaths
from moedisco.job.metrics import MetricsWriter
from moedisco.job.registry import plan
from moedisco.runner.execute import run_stage
from moedisco.stages.cluster import ClusterResult, eval_assignments
from moedisco.stages.stage_run import StageRun
from tests.conftest import CORPUS, tiny_spec_dict

FIELD = {"method": "field", "field": "domain"}


@pytest.fixture(autouse=True)
def no_embedding(monkeypatch):
    """Nothing here may load the embedding model: not the embed stage, not the held-out documents' clusters."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("a job that declares its clusters embedded documents")

    monkeypatch.setattr("moedisco.stages.embed.Embedder", refuse)


def _spec(tmp_path, name: str = "job", **sections):
    return build_spec(tiny_spec_dict(tmp_path / name, **sections))


def _set_up(spec) -> dict:
    """The plan's tasks before `source`, run as the local runner runs them; their summaries by stage."""
    paths, summaries = JobPaths(spec.output_dir), {}
    for task in (task for group in plan(spec) for task in group):
        if task.stage == "source":
            return summaries
        run = StageRun(spec, paths, MetricsWriter(paths.metrics), task, progress=False)
        summaries[task.stage] = run_stage(run)
    return summaries


def _domains_of(paths: JobPaths, split_name: str) -> list[str]:
    corpus = {record["text"]: record["domain"] for record in map(json.loads, CORPUS.read_text().splitlines())}
    return [corpus[text] for text in iter_texts(paths.texts(split_name))]


def _corpus(tmp_path, edit=None, count: int = 60, name: str = "corpus.jsonl"):
    """The bundled corpus's first `count` records, `edit(index, record)` applied to each, as a file."""
    records = [json.loads(line) for line in CORPUS.read_text().splitlines()[:count]]
    for index, record in enumerate(records):
        (edit or (lambda *_: None))(index, record)
    path = tmp_path / name
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_each_expert_gets_its_domains_documents_and_nothing_is_embedded(tmp_path):
    spec = _spec(tmp_path, cluster=FIELD)
    paths = JobPaths(spec.output_dir)
    summaries = _set_up(spec)
    assert list(summaries) == ["prepare", "cluster"]  # no embed stage in the plan
    assert not paths.embeddings.parent.exists()
    domains = ["code", "dictionary", "docs", "scripture"]  # the field's values, sorted
    clusters = ClusterResult.load(paths.clusters)
    assert clusters.method == "field" and clusters.domains == summaries["cluster"]["domains"] == domains
    train, held_out = _domains_of(paths, "train"), _domains_of(paths, "eval")
    assert held_out and set(held_out) <= set(domains)
    np.testing.assert_array_equal(clusters.assignments, [domains.index(domain) for domain in train])
    np.testing.assert_array_equal(eval_assignments(spec, paths), [domains.index(domain) for domain in held_out])
    for expert, domain in enumerate(domains):
        assert TokenShard.load(paths.cluster_tokens(expert)).num_documents == train.count(domain)
    assert clusters.sizes == [train.count(domain) for domain in domains]
    with pytest.raises(ValueError, match="domains of a document field"):
        clusters.assign(np.zeros((2, 8)))
    # Run again, as a resumed job does: the same clusters, the shards kept.
    written = (paths.cluster_tokens(0) / "shard.json").stat().st_mtime_ns
    assert _set_up(spec)["cluster"]["shards_written"] == []
    assert (paths.cluster_tokens(0) / "shard.json").stat().st_mtime_ns == written


def test_declared_domains_order_the_experts_and_skip_the_others(tmp_path):
    cluster = {**FIELD, "domains": ["scripture", "code"]}
    spec = _spec(tmp_path, cluster=cluster, model={"num_experts": 2}, data={"on_error": "skip"})
    paths = JobPaths(spec.output_dir)
    summaries = _set_up(spec)
    train = _domains_of(paths, "train")
    assert set(train) == {"scripture", "code"} and summaries["prepare"]["skipped"] > 0
    assert ClusterResult.load(paths.clusters).sizes == [train.count("scripture"), train.count("code")]
    np.testing.assert_array_equal(eval_assignments(spec, paths),
                                  [["scripture", "code"].index(domain) for domain in _domains_of(paths, "eval")])


def test_an_unlisted_or_missing_domain_is_named_or_skipped(tmp_path):
    cluster = {**FIELD, "domains": ["scripture", "code", "docs", "other"]}
    with pytest.raises(DataError, match=r"corpus.jsonl:\d+: domain 'dictionary' is none of cluster.domains"):
        _set_up(_spec(tmp_path, "unlisted", cluster=cluster))
    missing = _corpus(tmp_path, lambda index, record: index == 6 and record.pop("domain"))
    with pytest.raises(DataError, match=r"corpus.jsonl:7: no field 'domain'"):
        _set_up(_spec(tmp_path, "raise", cluster=FIELD, data={"train": str(missing), "max_documents": None}))
    skipped = _spec(tmp_path, "skip", cluster=FIELD, data={"train": str(missing), "max_documents": None,
                                                           "on_error": "skip"})
    assert _set_up(skipped)["prepare"]["skipped"] == 1


def test_a_domain_count_other_than_the_experts_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"4 values \(code, dictionary, docs, scripture\), but model.num_experts is "
                                        r"3"):
        _set_up(_spec(tmp_path, "three", cluster=FIELD, model={"num_experts": 3}))
    cluster = {**FIELD, "domains": ["scripture", "code", "docs", "other"]}
    with pytest.raises(DataError, match=r"no training document has domain other"):
        _set_up(_spec(tmp_path, "empty", cluster=cluster, data={"on_error": "skip"}))


def test_a_held_out_domain_no_expert_has_is_named(tmp_path):
    held_out = _corpus(tmp_path, lambda index, record: record.update(domain="news" if index == 3 else "code"),
                       count=20, name="held_out.jsonl")
    train = _corpus(tmp_path, lambda index, record: record.update(domain=("code", "docs")[index % 2]), count=80)
    data = {"train": str(train), "eval": str(held_out), "max_documents": None}
    spec = _spec(tmp_path, cluster=FIELD, model={"num_experts": 2}, data=data)
    with pytest.raises(DataError, match=r"eval.jsonl: documents of domain news, which no expert has"):
        _set_up(spec)


def test_fields_are_read_from_json_and_parquet_and_not_from_plain_text(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "one", "lang": "en"}, {"text": "two", "lang": 7}]))
    pq.write_table(pa.table({"text": ["three", "four", "five"], "lang": ["fr", None, "de"]}), tmp_path / "b.parquet")
    cfg, domain = DataConfig(train=tmp_path, on_error="skip"), DomainField("lang")
    report = ReadReport()
    assert [tuple(doc) for doc in iter_records(tmp_path, cfg, report, domain)] == [
        ("one", "en"), ("two", "7"), ("three", "fr"), ("five", "de")]
    assert report.num_skipped == 1
    with pytest.raises(DataError, match=r"b.parquet row 2: no field 'lang'"):
        list(iter_records(tmp_path, DataConfig(train=tmp_path), domain=domain))
    with pytest.raises(DataError, match="no column 'source'"):
        list(iter_records(tmp_path / "b.parquet", cfg, domain=DomainField("source")))
    (tmp_path / "c.txt").write_text("plain\n\ntext\n")
    with pytest.raises(DataError, match="plain text has no fields"):
        list(iter_records(tmp_path / "c.txt", cfg, domain=domain))


def test_one_cluster_holds_every_document(tmp_path):
    spec = _spec(tmp_path, method="extend", extend={"base": str(tmp_path / "base")})
    paths = JobPaths(spec.output_dir)
    summaries = _set_up(spec)
    assert list(summaries) == ["prepare", "cluster"] and not paths.embeddings.parent.exists()
    clusters = ClusterResult.load(paths.clusters)
    assert clusters.sizes == [summaries["prepare"]["train_documents"]] and clusters.method == "single"
    assert TokenShard.load(paths.cluster_tokens(0)).num_documents == summaries["prepare"]["train_documents"]
    held_out = eval_assignments(spec, paths)
    assert len(held_out) == summaries["prepare"]["eval_documents"] > 0 and not held_out.any()


def test_the_ray_runners_cluster_stage_declares_the_same_clusters(tmp_path):
    """Ray's cluster stage, on Ray Data or in the data worker, reads the domains in its own process: no Ray."""
    from ray_cluster.data.stages import DATA_STAGES

    local = _spec(tmp_path, "local", cluster=FIELD)
    _set_up(local)
    expected = ClusterResult.load(JobPaths(local.output_dir).clusters)
    for name in ("ray_data", "one_process"):
        spec = _spec(tmp_path, name, cluster=FIELD)
        paths = JobPaths(spec.output_dir)
        run_stage(StageRun(spec, paths, MetricsWriter(paths.metrics), plan(spec)[0][0], progress=False))
        stage = DATA_STAGES["cluster"]
        summary = (stage.on_ray_data(spec, paths, max_nodes=2) if name == "ray_data"
                   else stage.in_one_process(spec, paths))
        clusters = ClusterResult.load(paths.clusters)
        assert summary["domains"] == clusters.domains == expected.domains
        np.testing.assert_array_equal(clusters.assignments, expected.assignments)
        np.testing.assert_array_equal(eval_assignments(spec, paths),
                                      eval_assignments(local, JobPaths(local.output_dir)))


def test_the_ray_runners_split_of_several_files_keeps_the_domains_as_the_local_one(tmp_path):
    """The Ray Data split's task function and join, called here without Ray: the very JSON lines, domains and all."""
    from moedisco.io.storage import join
    from moedisco.stages.prepare import split_and_tokenizer
    from ray_cluster.data import prepare
    from ray_cluster.placement import job_storage

    (tmp_path / "corpus").mkdir()
    for part in range(3):
        _corpus(tmp_path / "corpus", count=40 * (part + 1), name=f"part-{part}.jsonl")
    data = {"train": str(tmp_path / "corpus"), "max_documents": None}
    ray_spec, local_spec = (_spec(tmp_path, name, cluster=FIELD, data=data) for name in ("ray", "local"))
    files = sorted((tmp_path / "corpus").iterdir())
    parts = prepare.fresh(join(job_storage(ray_spec), "split"))
    batch = prepare._split_batch({"index": np.arange(3), "file": np.array([str(f) for f in files])}, ray_spec, parts)
    rows = [{name: values[i] for name, values in batch.items()} for i in range(3)]
    assert not any(row["error"] for row in rows)
    prepare.join_split(ray_spec, JobPaths(ray_spec.output_dir), rows)
    split_and_tokenizer(local_spec, JobPaths(local_spec.output_dir))
    for name in ("train", "eval"):
        ray_lines, local_lines = (JobPaths(s.output_dir).texts(name).read_text() for s in (ray_spec, local_spec))
        assert ray_lines == local_lines and all('"domain"' in line for line in ray_lines.splitlines())
