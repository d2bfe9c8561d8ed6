"""The streaming data path: token shards and the batch source, the hash split, bad lines at scale, resuming."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moedisco.config.spec import ClusterConfig, DataConfig, TokenizerConfig
from moedisco.io.documents import DataError, ReadReport, iter_documents
from moedisco.io.token_shards import SequenceSource, TokenShard, batch_for_step
from moedisco.job.layout import JobPaths
from moedisco.job.metrics import MetricsWriter
from moedisco.job.registry import Task
from moedisco.stages import cluster
from moedisco.stages.cluster import stage_cluster
from moedisco.stages.embed import stage_embed
from moedisco.stages.prepare import is_held_out, stage_prepare, train_tokenizer, write_tokens
from moedisco.stages.stage_run import StageRun
from tests.helpers import TokenizedCorpus, read_documents

TEXTS = [f"document {i} is about {'cats' if i % 3 else 'stars'} and {'rain' * (i % 5)} at length." for i in range(60)]


def test_shard_batches_are_those_of_the_packed_tensor(tmp_path):
    tokenizer = train_tokenizer(TEXTS, TokenizerConfig(vocab_size=300, min_frequency=1))
    shard = write_tokens(iter(TEXTS), tokenizer, tmp_path / "shard")
    corpus = TokenizedCorpus.from_texts(TEXTS, tokenizer)
    assert np.array_equal(shard.offsets, corpus.offsets) and np.array_equal(shard.tokens, corpus.tokens)
    sparse = np.array([0, 7, 8, 31, 59])
    picked = np.concatenate([tokens for tokens, _ in shard.select(sparse, chunk_docs=8)])
    assert torch.equal(torch.from_numpy(picked[: len(picked) // 8 * 8].astype(np.int64)).view(-1, 8),
                       corpus.pack(8, sparse))
    source, seqs_NL = SequenceSource(shard, 8), corpus.pack(8)
    assert source.shape == tuple(seqs_NL.shape)
    steps = range(0, 3 * len(seqs_NL) // 5 + 2)  # several epochs, batches that straddle two of them
    assert all(torch.equal(source.batch(s, 5, seed=4), batch_for_step(seqs_NL, s, 5, seed=4)) for s in steps)


def test_hash_split_is_per_document_and_deterministic():
    held = {t for t in TEXTS if is_held_out(t, 0.3, seed=1)}
    assert 0 < len(held) < len(TEXTS)
    assert held == {t for t in reversed(TEXTS) if is_held_out(t, 0.3, seed=1)}  # order plays no part
    assert held != {t for t in TEXTS if is_held_out(t, 0.3, seed=2)}
    assert not any(is_held_out(t, 0.0, seed=1) for t in TEXTS)


def test_glob_and_text_files_stream(tmp_path):
    for part in range(3):
        (tmp_path / f"part-{part}.txt").write_text("\n\n".join(TEXTS[part * 20 : (part + 1) * 20]) + "\n")
    (tmp_path / "other.jsonl").write_text('{"text": "not matched"}\n')
    assert read_documents(tmp_path / "part-*.txt", DataConfig(train=tmp_path)) == TEXTS
    with pytest.raises(DataError, match="matches no file"):
        read_documents(tmp_path / "nothing-*.jsonl", DataConfig(train=tmp_path))


def test_a_bad_line_in_a_million_is_named_or_skipped_and_counted(tmp_path):
    path = tmp_path / "big.jsonl"
    good = '{"text": "a short document"}\n'
    path.write_text(good * 999_998 + '{"text": broken\n' + good)
    with pytest.raises(DataError, match=r"big.jsonl:999999: malformed line"):
        for _ in iter_documents(path, DataConfig(train=path)):
            pass
    # skipping is the same reader: counted on a smaller file, to keep the suite fast
    small = tmp_path / "small.jsonl"
    small.write_text((good * 300 + '{"text": 5}\n' + "not json\n") * 3)
    report = ReadReport()
    count = sum(1 for _ in iter_documents(small, DataConfig(train=small, on_error="skip"), report))
    assert (count, report.num_documents, report.num_skipped) == (900, 900, 6)


def test_streaming_fit_assigns_every_document_from_a_sample():
    vectors_ND = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    cfg = ClusterConfig(method="kmeans", n_init=1)
    whole = cluster.fit_streaming(vectors_ND, cfg, 3, seed=0, max_fit_documents=300)
    assert np.array_equal(whole.assignments, cluster.fit_clusters(vectors_ND, cfg, 3, seed=0).assignments)
    sampled = cluster.fit_streaming(vectors_ND, cfg, 3, seed=0, max_fit_documents=100)
    assert len(sampled.assignments) == 300 and min(sampled.sizes) > 0
    assert np.array_equal(sampled.assignments, sampled.assign(vectors_ND))  # the rest by nearest centroid


def _run(spec, stage: str) -> dict:
    paths = JobPaths(spec.output_dir)
    functions = {"prepare": stage_prepare, "embed": stage_embed, "cluster": stage_cluster}
    return functions[stage](StageRun(spec, paths, MetricsWriter(paths.metrics), Task(stage), progress=False))


def _mtime(path) -> int:
    return path.stat().st_mtime_ns


def test_interrupted_data_stages_resume_without_redoing_finished_pieces(tiny_spec_factory):
    spec = tiny_spec_factory(data={"max_documents": 120})
    paths = JobPaths(spec.output_dir)
    prepared = _run(spec, "prepare")
    assert prepared["train_documents"] + prepared["eval_documents"] == 120
    # prepare stopped while writing the held-out tokens: the split, tokenizer and train shard stay as they are
    train_written = _mtime(paths.tokens("train") / "shard.json")
    eval_tokens = np.array(TokenShard.load(paths.tokens("eval")).tokens)
    for name in ("shard.json", "tokens.bin"):
        (paths.tokens("eval") / name).unlink()
    assert _run(spec, "prepare") == prepared
    assert _mtime(paths.tokens("train") / "shard.json") == train_written
    assert np.array_equal(TokenShard.load(paths.tokens("eval")).tokens, eval_tokens)
    # embed stopped after its first chunk of 64 rows (embed.batch_size): the rest is embedded, the chunk kept
    embedded = _run(spec, "embed")
    full = np.load(paths.embeddings).copy()
    rows = 64
    vectors = np.load(paths.embeddings, mmap_mode="r+")
    vectors[rows:] = 0.0
    vectors.flush()
    del vectors
    paths.embed_progress.write_text(json.dumps({"rows": rows, "documents": embedded["documents"], "dim": 384}))
    from moedisco.io import documents

    chunk, documents.CHUNK_DOCUMENTS = documents.CHUNK_DOCUMENTS, rows
    try:
        assert _run(spec, "embed")["resumed_from"] == rows
    finally:
        documents.CHUNK_DOCUMENTS = chunk
    assert np.allclose(np.load(paths.embeddings), full, atol=1e-6)
    # cluster stopped while writing shard 1: shards 0, 2, 3 are kept, 1 is written again, the fit is not redone
    first = _run(spec, "cluster")
    assert first["fitted"] and first["shards_written"] == [0, 1, 2, 3]
    kept = {k: _mtime(paths.cluster_tokens(k) / "shard.json") for k in (0, 2, 3)}
    shard_1 = np.array(TokenShard.load(paths.cluster_tokens(1)).tokens)
    (paths.cluster_tokens(1) / "shard.json").unlink()
    again = _run(spec, "cluster")
    assert not again["fitted"] and again["shards_written"] == [1] and again["sizes"] == first["sizes"]
    assert {k: _mtime(paths.cluster_tokens(k) / "shard.json") for k in (0, 2, 3)} == kept
    assert np.array_equal(TokenShard.load(paths.cluster_tokens(1)).tokens, shard_1)
    assert sum(TokenShard.load(paths.cluster_tokens(k)).num_documents for k in range(4)) == embedded["documents"]


def test_token_mean_is_the_mean_of_the_wrappers_truncated_ids():
    """The embedder encodes through the Rust tokenizer directly; the vectors are those of the Hugging Face call."""
    from moedisco.config.spec import EmbedConfig
    from moedisco.stages.embed import Embedder

    embedder = Embedder(EmbedConfig(max_length=16))
    texts = [*TEXTS[:9], "word " * 40]  # the last one is cut at max_length - 2 tokens
    ids = embedder.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=14)["input_ids"]
    weight = embedder.model.get_input_embeddings().weight.detach().numpy()
    assert max(map(len, ids)) == 14
    np.testing.assert_allclose(embedder(texts), np.stack([weight[i].mean(0) for i in ids]), atol=1e-6)


def test_row_file_reads_what_the_memory_map_holds(tmp_path):
    from moedisco.io.token_shards import RowFile

    matrix = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
    np.save(tmp_path / "m.npy", matrix)
    rows = RowFile(tmp_path / "m.npy", block_rows=8)
    ids = np.array([0, 7, 8, 9, 31, 49])
    assert len(rows) == 50 and np.array_equal(np.asarray(rows), matrix)
    assert np.array_equal(rows[ids], matrix[ids]) and np.array_equal(rows[45:60], matrix[45:])
    with pytest.raises(ValueError, match="ascending"):
        rows[np.array([3, 1])]
