"""Corpus reading, held-out split, tokenizer and sequence packing.

    for text in iter_documents(path, spec.data):             # streamed; errors name file and line
        held_out = is_held_out(text, 0.05, seed=0)            # the hash split (moedisco.corpus writes the splits)
    docs = read_documents(path, spec.data)                   # a small corpus as a list
    tokenizer = train_tokenizer(train_docs, spec.tokenizer)
    corpus = TokenizedCorpus.from_texts(train_docs, tokenizer)
    seqs_NL = corpus.pack(seq_len=256, doc_ids=cluster_doc_ids)   # LongTensor [num_sequences, seq_len]

Legend: N = number of packed sequences, L = sequence length.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from moedisco import storage
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


GLOB_CHARS = set("*?[")


def corpus_files(path: Path | str) -> list[Path | str]:
    """The files of a corpus given as a file, a folder (searched recursively) or a glob pattern; on object
    storage (`s3://`, `gs://`), the objects, as URIs."""
    if storage.is_uri(path):
        try:
            files = storage.list_files(path, tuple(SUFFIX_FORMATS))
        except storage.StorageError as error:
            raise DataError(str(error)) from None
        if not files:
            raise DataError(f"{path}: no object there (nor one matching it, nor a .jsonl/.json/.parquet/.txt under it)")
        return files
    if GLOB_CHARS & set(str(path)):
        anchor = Path(path.anchor or ".")
        files = sorted(p for p in anchor.glob(str(path.relative_to(anchor)) if path.is_absolute() else str(path))
                       if p.is_file())
        if not files:
            raise DataError(f"{path}: the pattern matches no file")
        return files
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIX_FORMATS)
        if not files:
            raise DataError(f"{path}: folder holds no .jsonl/.json/.parquet/.txt files")
        return files
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    return [path]


def detect_format(path: Path | str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = PurePosixPath(str(path)).suffix
    try:
        return SUFFIX_FORMATS[suffix]
    except KeyError:
        raise DataError(f"{path}: cannot tell the format from {suffix!r}; set data.format") from None


def _open_text(path: Path | str) -> io.TextIOWrapper:
    """A local file or an object, as UTF-8 text (a bad byte raises, and names the file)."""
    return io.TextIOWrapper(storage.open_input(path), encoding="utf-8", errors="strict")


def _text_of(record: object, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        raise DataError(f"{where}: no field {field!r} (set data.text_field)")
    text = record[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} is {type(text).__name__}, not a string")
    return text


def _read_jsonl(path: Path | str, field: str, skip: bool, report: ReadReport) -> Iterator[str]:
    with _open_text(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield _text_of(json.loads(line), field, f"{path}:{line_no}")
            except (json.JSONDecodeError, DataError) as error:
                if not skip:
                    raise DataError(f"{path}:{line_no}: malformed line: {error}") from None
                report.num_skipped += 1


def _read_json(path: Path | str, field: str, skip: bool, report: ReadReport) -> Iterator[str]:
    # A JSON array cannot be parsed in pieces: a .json file is read whole (use JSONL or Parquet for big corpora).
    try:
        with _open_text(path) as handle:
            records = json.loads(handle.read())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: not valid JSON: {error.msg}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: a .json corpus must be a list of objects")
    for index, record in enumerate(records):
        try:
            yield _text_of(record, field, f"{path}[{index}]")
        except DataError:
            if not skip:
                raise
            report.num_skipped += 1


def _read_parquet(path: Path | str, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(storage.open_input(path, seekable=True))  # its footer comes first
    if field not in parquet.schema_arrow.names:
        raise DataError(f"{path}: no column {field!r} (columns: {', '.join(parquet.schema_arrow.names)})")
    for batch in parquet.iter_batches(batch_size=4096, columns=[field]):
        yield from (text for text in batch.column(0).to_pylist() if isinstance(text, str))


def _read_text(path: Path | str) -> Iterator[str]:
    # Plain text: documents are separated by blank lines, the usual convention for paragraph corpora.
    with _open_text(path) as handle:
        block: list[str] = []
        for line in itertools.chain(handle, [""]):
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block).strip()
                block = []


def read_file(path: Path | str, fmt: str, field: str, skip: bool, report: ReadReport) -> Iterator[str]:
    fmt = detect_format(path, fmt)
    readers = {"jsonl": lambda: _read_jsonl(path, field, skip, report),
               "json": lambda: _read_json(path, field, skip, report),
               "parquet": lambda: _read_parquet(path, field), "text": lambda: _read_text(path)}
    try:
        yield from readers[fmt]()
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except storage.StorageError as error:
        raise DataError(str(error)) from None
    except OSError as error:  # an object read half-way fails as it is read, not as it is opened
        if not storage.is_uri(path):
            raise
        raise DataError(f"{path}: {error}; {storage.CREDENTIALS}") from None


def iter_documents(path: Path | str, cfg: DataConfig, report: ReadReport | None = None) -> Iterator[str]:
    """Every non-empty document under `path`, in file order, one at a time (`data.max_documents` at most)."""
    report = report if report is not None else ReadReport()
    texts = (t for file in corpus_files(path) for t in read_file(file, cfg.format, cfg.text_field,
                                                                  cfg.on_error == "skip", report) if t.strip())
    for text in itertools.islice(texts, cfg.max_documents):
        report.num_documents += 1
        yield text
    if not report.num_documents:
        raise DataError(f"{path}: no documents with text found")
    if report.num_skipped:
        log.warning("%s: skipped %d malformed records", path, report.num_skipped)


def read_documents(path: Path | str, cfg: DataConfig, report: ReadReport | None = None) -> list[str]:
    """`iter_documents` as a list: for corpora that fit in memory."""
    return list(iter_documents(path, cfg, report))


def eval_share(text: str, seed: int) -> float:
    """A document's place in [0, 1), fixed by its text and the seed: the split needs no global view."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") / 2**64


def is_held_out(text: str, eval_fraction: float, seed: int) -> bool:
    """Hash split: a document is held out when its share is below `eval_fraction`, wherever it sits in the corpus,
    so the split streams and a document keeps its side when others are added or removed."""
    return eval_fraction > 0 and eval_share(text, seed) < eval_fraction


def split_documents(docs: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded random held-out split; at least one document on each side when there are two or more."""
    order = np.random.default_rng(seed).permutation(len(docs))
    num_eval = min(max(1, round(len(docs) * eval_fraction)), len(docs) - 1) if eval_fraction > 0 else 0
    eval_ids, train_ids = sorted(order[:num_eval]), sorted(order[num_eval:])
    return [docs[i] for i in train_ids], [docs[i] for i in eval_ids]


def train_tokenizer(docs: Iterable[str], cfg: TokenizerConfig) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `docs` (the caller bounds them: `tokenizer.sample_documents`), wrapped as a
    Hugging Face fast tokenizer."""
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
