"""Reading a corpus: the documents of JSONL, JSON, Parquet or text files, one at a time, and a split's JSON lines.

    for text in iter_documents("corpus/*.jsonl", spec.data):   # streamed; a malformed record names file and line
        ...
    for doc in iter_records(path, spec.data, domain=DomainField("source")):   # Document(text, domain)
        handle.write(split_line(doc))                          # a split's JSON line: {"text": ..., "domain": ...}
    for texts in chunks(iter_texts(paths.texts("train"))):     # a split's documents, CHUNK_DOCUMENTS at a time
    domains = list(iter_domains(paths.texts("train")))         # `cluster.method: field`: each document's domain

`data.train` is a file, a folder (searched recursively), a glob, or the same on object storage (`moedisco.io.storage`).
With `cluster.method: field` each record also names its domain (`DomainField`): a record without one, or with one
that `cluster.domains` does not list, is malformed (raised or skipped as `data.on_error` says).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal, NamedTuple, Protocol

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



class Document(NamedTuple):
    text: str
    domain: str | None = None  # `cluster.method: field`: the value of the record's `cluster.field`



@dataclass(frozen=True)
class DomainField:
    """`cluster.method: field`: the record field naming each document's domain, and the domains a document may
    have (None: any)."""

    name: str
    domains: tuple[str, ...] | None = None

    def value_of(self, record: dict, where: str) -> str:
        value = record.get(self.name)
        if value is None or value == "":
            raise DataError(f"{where}: no field {self.name!r} (cluster.field: the document's domain)")
        if isinstance(value, bool) or not isinstance(value, (str, int)):  # an id-like integer reads as its digits
            raise DataError(f"{where}: field {self.name!r} is {type(value).__name__}, not a string")
        value = str(value)
        if self.domains is not None and value not in self.domains:
            raise DataError(f"{where}: {self.name} {value!r} is none of cluster.domains ({', '.join(self.domains)})")
        return value



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



def _document_of(record: object, field: str, domain: DomainField | None, where: str) -> Document:
    text = _text_of(record, field, where)
    return Document(text, None if domain is None else domain.value_of(record, where))



def _read_jsonl(path: Path | str, field: str, skip: bool, report: ReadReport,
                domain: DomainField | None) -> Iterator[Document]:
    with _open_text(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield _document_of(json.loads(line), field, domain, f"{path}:{line_no}")
            except (json.JSONDecodeError, DataError) as error:
                if not skip:  # a DataError names the file and line already
                    raise (error if isinstance(error, DataError) else
                           DataError(f"{path}:{line_no}: malformed line: {error}")) from None
                report.num_skipped += 1



def _read_json(path: Path | str, field: str, skip: bool, report: ReadReport,
               domain: DomainField | None) -> Iterator[Document]:
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
            yield _document_of(record, field, domain, f"{path}[{index}]")
        except DataError:
            if not skip:
                raise
            report.num_skipped += 1



def _read_parquet(path: Path | str, field: str, skip: bool, report: ReadReport,
                  domain: DomainField | None) -> Iterator[Document]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(storage.open_input(path, seekable=True))  # its footer comes first
    columns = [field] if domain is None else [field, domain.name]
    for column in columns:
        if column not in parquet.schema_arrow.names:
            raise DataError(f"{path}: no column {column!r} (columns: {', '.join(parquet.schema_arrow.names)})")
    row = 0
    for batch in parquet.iter_batches(batch_size=4096, columns=columns):
        for values in zip(*(batch.column(i).to_pylist() for i in range(len(columns)))):
            row += 1
            if not isinstance(values[0], str):
                continue
            if domain is None:
                yield Document(values[0])
                continue
            try:
                yield Document(values[0], domain.value_of({domain.name: values[1]}, f"{path} row {row}"))
            except DataError:
                if not skip:
                    raise
                report.num_skipped += 1



def _read_text(path: Path | str) -> Iterator[Document]:
    # Plain text: documents are separated by blank lines, the usual convention for paragraph corpora.
    with _open_text(path) as handle:
        block: list[str] = []
        for line in itertools.chain(handle, [""]):
            if line.strip():
                block.append(line)
            elif block:
                yield Document("".join(block).strip())
                block = []



def read_file(path: Path | str, fmt: str, field: str, skip: bool, report: ReadReport) -> Iterator[str]:
    """The texts of one file's records (`read_records`)."""
    return (doc.text for doc in read_records(path, fmt, field, skip, report))



def read_records(path: Path | str, fmt: str, field: str, skip: bool, report: ReadReport,
                 domain: DomainField | None = None) -> Iterator[Document]:
    """One file's records, with each one's domain when `domain` names its field."""
    fmt = detect_format(path, fmt)
    if fmt == "text" and domain is not None:
        raise DataError(f"{path}: plain text has no fields; cluster.method 'field' needs JSONL, JSON or Parquet "
                        "documents")
    readers = {"jsonl": lambda: _read_jsonl(path, field, skip, report, domain),
               "json": lambda: _read_json(path, field, skip, report, domain),
               "parquet": lambda: _read_parquet(path, field, skip, report, domain), "text": lambda: _read_text(path)}
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
    return (doc.text for doc in iter_records(path, cfg, report))



def iter_records(path: Path | str, cfg: ReadOptions, report: ReadReport | None = None,
                 domain: DomainField | None = None) -> Iterator[Document]:
    """`iter_documents`, each document with its domain when `domain` names its field."""
    report = report if report is not None else ReadReport()
    docs = (doc for file in corpus_files(path)
            for doc in read_records(file, cfg.format, cfg.text_field, cfg.on_error == "skip", report, domain)
            if doc.text.strip())
    for doc in itertools.islice(docs, cfg.max_documents):
        report.num_documents += 1
        yield doc
    if not report.num_documents:
        raise DataError(f"{path}: no documents with text found")
    if report.num_skipped:
        log.warning("%s: skipped %d malformed records", path, report.num_skipped)



CHUNK_DOCUMENTS = 4096  # documents tokenized or embedded at a time: a few MB of text



DOMAIN_KEY = "domain"  # a split's JSON lines name each document's domain under this key (`cluster.method: field`)



def split_line(doc: Document) -> str:
    """A document as a line of a split's JSON lines: {"text": ...}, and {"domain": ...} when it has one."""
    record = {"text": doc.text} if doc.domain is None else {"text": doc.text, DOMAIN_KEY: doc.domain}
    return json.dumps(record) + "\n"



def iter_domains(path: Path) -> Iterator[str]:
    """The domain of each document of a split's JSON lines (`cluster.method: field`), in order."""
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate((line for line in handle if line.strip()), start=1):
            record = json.loads(line)
            if DOMAIN_KEY not in record:
                raise DataError(f"{path}: document {line_no} has no domain: the split was written by a job "
                                "without cluster.method 'field'; use a new output_dir")
            yield record[DOMAIN_KEY]



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
