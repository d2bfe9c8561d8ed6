"""The Ray runner's data stages' own files: the indexed corpus and the assignment pass's rows, which a re-run
resumes from; the token shard a short tokenization must not leave finished; and the split of a corpus of several
files on Ray Data (one local Ray instance, no cluster), which must report bad input as the local runner does."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pytest
import ray

from moedisco.config.loading import build_spec
from moedisco.io.documents import DataError
from moedisco.io.token_shards import is_complete
from moedisco.job.layout import JobPaths
from moedisco.stages.cluster import ClusterResult
from moedisco.stages.prepare import split_and_tokenizer
from ray_cluster.data import prepare
from ray_cluster.data.embed_cluster import AssignedParts
from ray_cluster.data.shards import index_corpus
from tests.conftest import CORPUS, tiny_spec_dict


def _write_split(path, count: int) -> None:
    path.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(count)))


def test_the_index_is_reused_until_the_split_changes(tmp_path):
    train, out = tmp_path / "train.jsonl", tmp_path / "corpus"
    _write_split(train, 10)
    assert index_corpus(train, out, rows_per_shard=4) == 10
    shards = sorted(out.glob("*.parquet"))
    assert len(shards) == 3
    written = {p.name: p.stat().st_mtime_ns for p in shards}
    assert index_corpus(train, out, rows_per_shard=4) == 10
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == written  # nothing rewritten
    assert index_corpus(train, out, rows_per_shard=8) == 10  # other shards asked for: indexed again
    assert len(list(out.glob("*.parquet"))) == 2
    _write_split(train, 11)
    assert index_corpus(train, out, rows_per_shard=8) == 11


def _fit(shift: float) -> ClusterResult:
    return ClusterResult(np.zeros(0, np.int64), np.eye(2) + shift, 0.0, normalize=False, method="kmeans")


def test_assigned_parts_resume_their_own_fit_only(tmp_path):
    folder = tmp_path / "assigned"
    parts = AssignedParts(folder, _fit(0.0), num_docs=10, corpus=None)
    assert len(parts.read()["doc_id"]) == 0
    parts.write({"doc_id": np.array([4, 5, 6]), "cluster": np.array([1, 0, 1]), "sq_distance": np.array([.1, .2, .3])})
    (folder / "_partial-fit-cut-short.parquet").write_bytes(b"PAR1")  # a write interrupted before its rename
    again = AssignedParts(folder, _fit(0.0), num_docs=10, corpus=None).read()
    np.testing.assert_array_equal(again["doc_id"], [4, 5, 6])
    np.testing.assert_array_equal(again["cluster"], [1, 0, 1])
    assert not (folder / "_partial-fit-cut-short.parquet").exists()
    assert len(AssignedParts(folder, _fit(0.5), 10, corpus=None).read()["doc_id"]) == 0  # another fit: start over
    parts.write({"doc_id": np.array([4]), "cluster": np.array([1]), "sq_distance": np.array([.1])})
    assert len(AssignedParts(folder, _fit(0.0), 10, corpus={"bytes": 2}).read()["doc_id"]) == 0  # corpus edited
    assert len(AssignedParts(folder, _fit(0.0), 10, corpus=None).read()["doc_id"]) == 0  # and the old rows are gone


def test_a_short_tokenization_leaves_no_finished_shard(tmp_path, monkeypatch):
    class TwoOfThree:  # what a Ray Data pass that lost a block would give
        def iter_batches(self, **_):
            yield pa.table({"doc_id": [0, 1], "ids": pa.array([[5, 0], [7, 0]], type=pa.large_list(pa.int32()))})

    monkeypatch.setattr(prepare, "_tokenized", lambda *args: TwoOfThree())
    with pytest.raises(RuntimeError, match="2 documents tokenized of 3"):
        prepare.tokenize_on_ray_data(None, "corpus", None, tmp_path / "train_tokens", num_docs=3, max_nodes=1)
    assert not is_complete(tmp_path / "train_tokens")


@pytest.fixture(scope="module")
def local_ray():
    # The CPU tier's label: the split and tokenization run on its nodes.
    ray.init(address="local", num_cpus=2, object_store_memory=150 * 2**20, include_dashboard=False, log_to_driver=False,
             labels={"gpu_type": "cpu"})
    yield
    ray.shutdown()


def _three_files(folder, bad_line: str | None = None) -> None:
    folder.mkdir()
    lines = CORPUS.read_text().splitlines(keepends=True)[:300]
    if bad_line is not None:
        lines[100 + 4] = lines[200 + 2] = bad_line  # the fifth line of the second file, the third of the third
    for part in range(3):
        (folder / f"part-{part}.jsonl").write_text("".join(lines[part * 100 : (part + 1) * 100]))


def _spec(tmp_path, name: str, on_error: str):
    data = {"train": str(tmp_path / "corpus"), "max_documents": None, "on_error": on_error}
    return build_spec(tiny_spec_dict(tmp_path / name, data=data))


def test_a_split_on_ray_data_names_a_malformed_line_or_skips_it_as_the_local_runner_does(local_ray, tmp_path):
    _three_files(tmp_path / "corpus", bad_line='{"text": "cut sh\n')
    spec = _spec(tmp_path, "raise", "raise")
    files = sorted((tmp_path / "corpus").iterdir())
    with pytest.raises(DataError, match=re.escape(f"{files[1]}:5: malformed line")):  # the first, as one reader
        prepare.join_split(spec, JobPaths(spec.output_dir), prepare.split_parts(spec, files))
    ray_spec, local_spec = _spec(tmp_path, "ray", "skip"), _spec(tmp_path, "local", "skip")
    summary = prepare.join_split(ray_spec, JobPaths(ray_spec.output_dir), prepare.split_parts(ray_spec, files))
    local, _ = split_and_tokenizer(local_spec, JobPaths(local_spec.output_dir))
    assert summary == {k: local[k] for k in summary} and summary["skipped"] == 2
    for name in ("train", "eval"):
        ray_texts, local_texts = (JobPaths(s.output_dir).texts(name).read_bytes() for s in (ray_spec, local_spec))
        assert ray_texts == local_texts


def test_several_files_with_a_document_cap_are_split_by_one_reader(local_ray, tmp_path):
    """`data.max_documents` counts across the files in order, so the tasks per file would overshoot: one reader."""
    from moedisco.job.metrics import MetricsWriter
    from moedisco.job.registry import Task
    from moedisco.stages.prepare import stage_prepare
    from moedisco.stages.stage_run import StageRun

    _three_files(tmp_path / "corpus")
    specs = [build_spec(tiny_spec_dict(tmp_path / name, data={"train": str(tmp_path / "corpus"), "max_documents": 150}))
             for name in ("ray", "local")]
    ray_paths, local_paths = (JobPaths(s.output_dir) for s in specs)
    summary = ray.get(ray.remote(prepare.prepare_stage).remote(specs[0], ray_paths, 1))
    stage_prepare(StageRun(specs[1], local_paths, MetricsWriter(local_paths.metrics), Task("prepare"), progress=False))
    assert summary["split_tasks"] == 0 and summary["train_documents"] + summary["eval_documents"] == 150
    assert ray_paths.texts("train").read_bytes() == local_paths.texts("train").read_bytes()
