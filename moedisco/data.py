"""Corpus reading, held-out split, tokenizer and sequence packing.

    docs = read_documents(spec.data)                       # list[str], errors name file and line
    train_docs, eval_docs = split_documents(docs, 0.05, seed=0)
    tokenizer = train_tokenizer(train_docs, spec.tokenizer)
    corpus = TokenizedCorpus.from_texts(train_docs, tokenizer)
    seqs_NL = corpus.pack(seq_len=256, doc_ids=cluster_doc_ids)   # LongTensor [num_sequences, seq_len]

Legend: N = number of packed sequences, L = sequence length.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from moedisco.config import DataConfig, TokenizerConfig

log = logging.getLogger(__name__)

SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "text"}
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


class DataError(ValueError):
    """A corpus that cannot be read; the message names the file (and line) at fault."""


@dataclass
class ReadReport:
    num_documents: int = 0
    num_skipped: int = 0


def corpus_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIX_FORMATS)
        if not files:
            raise DataError(f"{path}: folder holds no .jsonl/.json/.parquet/.txt files")
        return files
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    return [path]


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    try:
        return SUFFIX_FORMATS[path.suffix]
    except KeyError:
        raise DataError(f"{path}: cannot tell the format from {path.suffix!r}; set data.format") from None


def _text_of(record: object, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        raise DataError(f"{where}: no field {field!r} (set data.text_field)")
    text = record[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} is {type(text).__name__}, not a string")
    return text


def _read_jsonl(path: Path, field: str, skip: bool, report: ReadReport) -> list[str]:
    texts = []
    with path.open(encoding="utf-8", errors="strict") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                texts.append(_text_of(json.loads(line), field, f"{path}:{line_no}"))
            except (json.JSONDecodeError, DataError) as error:
                if not skip:
                    raise DataError(f"{path}:{line_no}: malformed line: {error}") from None
                report.num_skipped += 1
    return texts


def _read_json(path: Path, field: str, skip: bool, report: ReadReport) -> list[str]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: not valid JSON: {error.msg}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: a .json corpus must be a list of objects")
    texts = []
    for index, record in enumerate(records):
        try:
            texts.append(_text_of(record, field, f"{path}[{index}]"))
        except DataError:
            if not skip:
                raise
            report.num_skipped += 1
    return texts


def _read_parquet(path: Path, field: str) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if field not in table.column_names:
        raise DataError(f"{path}: no column {field!r} (columns: {', '.join(table.column_names)})")
    return [text for text in table.column(field).to_pylist() if isinstance(text, str)]


def _read_text(path: Path) -> list[str]:
    # Plain text: documents are separated by blank lines, the usual convention for paragraph corpora.
    content = path.read_text(encoding="utf-8")
    return [block.strip() for block in content.split("\n\n") if block.strip()]


def read_file(path: Path, fmt: str, field: str, skip: bool, report: ReadReport) -> list[str]:
    fmt = detect_format(path, fmt)
    try:
        if fmt == "jsonl":
            return _read_jsonl(path, field, skip, report)
        if fmt == "json":
            return _read_json(path, field, skip, report)
        if fmt == "parquet":
            return _read_parquet(path, field)
        return _read_text(path)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def read_documents(path: Path, cfg: DataConfig, report: ReadReport | None = None) -> list[str]:
    """Every non-empty document under `path`, in file order."""
    report = report if report is not None else ReadReport()
    docs: list[str] = []
    for file in corpus_files(path):
        docs.extend(t for t in read_file(file, cfg.format, cfg.text_field, cfg.on_error == "skip", report) if t.strip())
    if cfg.max_documents is not None:
        docs = docs[: cfg.max_documents]
    if not docs:
        raise DataError(f"{path}: no documents with text found")
    report.num_documents = len(docs)
    if report.num_skipped:
        log.warning("%s: skipped %d malformed records", path, report.num_skipped)
    return docs


def split_documents(docs: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded random held-out split; at least one document on each side when there are two or more."""
    order = np.random.default_rng(seed).permutation(len(docs))
    num_eval = min(max(1, round(len(docs) * eval_fraction)), len(docs) - 1) if eval_fraction > 0 else 0
    eval_ids, train_ids = sorted(order[:num_eval]), sorted(order[num_eval:])
    return [docs[i] for i in train_ids], [docs[i] for i in eval_ids]


def train_tokenizer(docs: list[str], cfg: TokenizerConfig) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the corpus, wrapped as a Hugging Face fast tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    if not path.is_dir():
        raise DataError(f"tokenizer.path {path}: not a folder")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer.path {path}: the tokenizer has no eos token to separate documents")
    return tokenizer


@dataclass
class TokenizedCorpus:
    """All documents' tokens in one flat array; `offsets[i]:offsets[i+1]` are document i's tokens (EOS included)."""

    tokens: np.ndarray
    offsets: np.ndarray

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def from_texts(cls, texts: list[str], tokenizer: PreTrainedTokenizerFast, batch_size: int = 512) -> TokenizedCorpus:
        eos = tokenizer.eos_token_id
        pieces = []
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(texts[start : start + batch_size], add_special_tokens=False)["input_ids"]
            pieces.extend(ids + [eos] for ids in encoded)
        lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        tokens = np.fromiter((t for p in pieces for t in p), dtype=np.int32, count=int(offsets[-1]))
        return cls(tokens=tokens, offsets=offsets)

    def save(self, path: Path) -> None:
        np.savez(path, tokens=self.tokens, offsets=self.offsets)

    @classmethod
    def load(cls, path: Path) -> TokenizedCorpus:
        with np.load(path) as arrays:
            return cls(tokens=arrays["tokens"], offsets=arrays["offsets"])

    def pack(self, seq_len: int, doc_ids: np.ndarray | None = None) -> torch.Tensor:
        """Concatenate the chosen documents and cut them into [N, L] sequences (the ragged tail is dropped)."""
        if doc_ids is None:
            stream = self.tokens
        else:
            stream = np.concatenate([self.tokens[self.offsets[i] : self.offsets[i + 1]] for i in doc_ids] or [[]])
        num_seqs = len(stream) // seq_len
        if num_seqs == 0:
            raise DataError(f"only {len(stream)} tokens: fewer than one sequence of {seq_len}; lower data.sequence_length")
        seqs_NL = torch.from_numpy(stream[: num_seqs * seq_len].astype(np.int64)).view(num_seqs, seq_len)
        return seqs_NL


def batch_for_step(seqs_NL: torch.Tensor, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The batch of optimizer step `step`: a seeded shuffle per epoch, so a resumed run sees the same stream."""
    num_seqs = seqs_NL.shape[0]
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, slots = positions // num_seqs, positions % num_seqs
    rows = []
    for epoch in epochs.unique().tolist():
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        permutation = torch.randperm(num_seqs, generator=generator)
        rows.append(permutation[slots[epochs == epoch]])
    return seqs_NL[torch.cat(rows)]
