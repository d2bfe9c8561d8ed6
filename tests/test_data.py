"""Corpus readers, held-out split, tokenizer and packing."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from moedisco.config.spec import DataConfig, TokenizerConfig
from moedisco.io.documents import DataError, ReadReport
from moedisco.io.token_shards import batch_for_step
from moedisco.stages.prepare import train_tokenizer
from tests.helpers import TokenizedCorpus, read_documents

TEXTS = [f"document number {i} talks about {'cats' if i % 2 else 'stars'} at some length." for i in range(40)]


def _cfg(path, **kw):
    return DataConfig(train=path, **kw)


def test_reads_jsonl_json_parquet_text_and_folders(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in TEXTS[:10]))
    (tmp_path / "b.json").write_text(json.dumps([{"body": t} for t in TEXTS[10:20]]))
    pq.write_table(pa.table({"body": TEXTS[20:30]}), tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text("\n\n".join(TEXTS[30:40]))
    assert read_documents(tmp_path / "a.jsonl", _cfg(tmp_path, text_field="body")) == TEXTS[:10]
    assert read_documents(tmp_path, _cfg(tmp_path, text_field="body")) == TEXTS


def test_malformed_line_names_file_and_line_or_is_skipped(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n{"other": "x"}\n{"text": "also fine"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        read_documents(path, _cfg(path))
    report = ReadReport()
    assert read_documents(path, _cfg(path, on_error="skip"), report) == ["fine", "also fine"]
    assert report.num_skipped == 2


def test_missing_field_and_missing_file(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"content": "hi"}\n')
    with pytest.raises(DataError, match="no field 'text'"):
        read_documents(path, _cfg(path))
    with pytest.raises(DataError, match="no such file"):
        read_documents(tmp_path / "nope.jsonl", _cfg(tmp_path))



def test_tokenizer_pack_and_deterministic_batches():
    tokenizer = train_tokenizer(TEXTS, TokenizerConfig(vocab_size=300, min_frequency=1))
    corpus = TokenizedCorpus.from_texts(TEXTS, tokenizer)
    assert corpus.num_documents == 40
    assert tokenizer.decode(corpus.tokens[corpus.offsets[3] : corpus.offsets[4] - 1]) == TEXTS[3]
    seqs = corpus.pack(16)
    assert seqs.shape[1] == 16 and seqs.shape[0] == len(corpus.tokens) // 16
    odd = corpus.pack(16, doc_ids=[1, 3, 5])
    assert odd.numel() <= corpus.offsets[6] - corpus.offsets[5] + corpus.offsets[4] - corpus.offsets[3] + 99
    a, b = batch_for_step(seqs, 5, 4, seed=1), batch_for_step(seqs, 5, 4, seed=1)
    assert torch.equal(a, b) and a.shape == (4, 16)
    epoch = torch.cat([batch_for_step(seqs, s, 1, seed=0) for s in range(len(seqs))])
    assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, seqs.tolist()))
    with pytest.raises(DataError, match="sequence_length"):
        corpus.pack(10_000)
