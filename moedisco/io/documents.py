"""Reading a corpus: the documents of JSONL, JSON, Parquet or text files, one at a time, and a split's JSON lines.

    for text in iter_documents("corpus/*.jsonl", spec.data):   # streamed; a malformed record names file and line
        ...
    for texts in chunks(iter_texts(paths.texts("train"))):     # a split's documents, CHUNK_DOCUMENTS at a time

`data.train` is a file, a folder (searched recursively), a glob, or the same on object storage (`moedisco.io.storage`).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal, Protocol

from moedisco.io import storage

log = logging.getLogger(__name__)


class ReadOptions(Protocol):
    """What reading needs of the spec's `data` section (`moedisco.config.spec.DataConfig`)."""

    format: str
    text_field: str
    on_error: Literal["raise", "skip"]
    max_documents: int | None


SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "text"}



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



def iter_documents(path: Path | str, cfg: ReadOptions, report: ReadReport | None = None) -> Iterator[str]:
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



CHUNK_DOCUMENTS = 4096  # documents tokenized or embedded at a time: a few MB of text



def iter_texts(path: Path, skip: int = 0) -> Iterator[str]:
    """The documents of a split's JSON lines, one at a time; the first `skip` are passed over unparsed."""
    with path.open(encoding="utf-8") as handle:
        for line in itertools.islice((line for line in handle if line.strip()), skip, None):
            yield json.loads(line)["text"]



def load_texts(path: Path) -> list[str]:
    return list(iter_texts(path))



def chunks(items: Iterator, size: int | None = None) -> Iterator[list]:
    """`items` in lists of `size` (default `CHUNK_DOCUMENTS`, read when called)."""
    size = size or CHUNK_DOCUMENTS
    while chunk := list(itertools.islice(items, size)):
        yield chunk
