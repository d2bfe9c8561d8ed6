"""What the Ray runner's data stages leave on storage to resume from: the indexed corpus and the assignment pass's
rows (no Ray cluster needed: both are plain Parquet files)."""

from __future__ import annotations

import json

import numpy as np

from moedisco.cluster import ClusterResult
from ray_cluster.corpus import index_corpus
from ray_cluster.data import AssignedParts


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
    parts = AssignedParts(folder, _fit(0.0), num_docs=10)
    assert len(parts.read()["doc_id"]) == 0
    parts.write({"doc_id": np.array([4, 5, 6]), "cluster": np.array([1, 0, 1]), "sq_distance": np.array([.1, .2, .3])})
    (folder / "_partial-fit-cut-short.parquet").write_bytes(b"PAR1")  # a write interrupted before its rename
    again = AssignedParts(folder, _fit(0.0), num_docs=10).read()
    np.testing.assert_array_equal(again["doc_id"], [4, 5, 6])
    np.testing.assert_array_equal(again["cluster"], [1, 0, 1])
    assert not (folder / "_partial-fit-cut-short.parquet").exists()
    assert len(AssignedParts(folder, _fit(0.5), num_docs=10).read()["doc_id"]) == 0  # another fit: start over
    assert len(AssignedParts(folder, _fit(0.0), num_docs=10).read()["doc_id"]) == 0  # and the old rows are gone
