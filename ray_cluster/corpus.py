"""The Ray runner's prepare stage: the train split as Parquet shards with document ids, tokenized on Ray Data.

    summary = prepare_stage(spec, paths, num_cheap_nodes=2)   # OUTPUT/data/ as stage_prepare writes it, and
                                                              # STORAGE/<job>/corpus/*.parquet (doc_id, text)

1. The read and the hash split: for a corpus of several files (and no `data.max_documents`, which counts across
   them in order), a Ray Data task per file streams it through the local runner's readers into two JSON-lines
   parts on storage (`split_on_ray_data`), and the parts are joined in file order into OUTPUT/data/{train,
   eval}.jsonl: the files the local runner writes, byte for byte. A single file is read by one task, as the local
   runner reads it (`moedisco.stages.prepare.split_and_tokenizer`). The join, or that one reader, and the tokenizer on its
   bounded sample (the first train documents) run in one task of one CPU, on any node, as the whole stage ran
   before; the stage's own task only coordinates.
2. OUTPUT/data/train.jsonl is streamed into Parquet shards of `ROWS_PER_SHARD` documents with an explicit `doc_id`
   (its line), so document order, and every later index into the cluster assignments, matches the local runner.
   A marker (`_index.json`) records what was indexed; the embed stage and a re-run reuse the shards.
3. The shards are tokenized by a pool of actors on the cheap tier (`TokenizeBatches`: the job's Rust tokenizer,
   given as its JSON so no node reads OUTPUT), each reading its own shards from storage (`shard_dataset`: Ray
   Data moves their locations, not their texts), with Ray Data keeping the shards' order; the stage's process
   appends each batch's ids to the train token shard (`moedisco.io.token_shards.ShardWriter`) as it arrives, so neither
   the texts nor the tokens are ever held whole. The ids are the local runner's (`moedisco.stages.prepare.write_tokens`),
   document for document.
A split of at most one shard is tokenized in that one-CPU task, and not indexed (Ray Data's start-up would cost
more; the embed stage indexes it when it needs it), and the held-out split always is (a twentieth of the corpus by
default).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import shutil
import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from moedisco.config.resources import TierConfig
from moedisco.config.spec import JobSpec
from moedisco.io.storage import filesystem, is_uri, join, list_files, make_dir, open_input, remove_tree
from ray_cluster.placement import job_storage, node_cpus, prepare_worker, task_options

if TYPE_CHECKING:
    from moedisco.job.layout import JobPaths

log = logging.getLogger(__name__)

ROWS_PER_SHARD = 4096
INDEX_MARKER = "_index.json"  # Parquet readers skip names starting with "_"
SHARD_NAME = "corpus-{:010d}.parquet"  # by its first doc_id: the names sort in corpus order
CHUNK_BYTES = 8 << 20
# Parquet's dictionary encoding is tried on every column and given up on for unique texts and float vectors; it
# had doubled the time of each shard's write.
PARQUET_ARGS = {"use_dictionary": False}


def fresh(folder: Path | str) -> str:
    # A stage interrupted half-way left partial files; a re-run rewrites the folder whole.
    remove_tree(folder)
    make_dir(folder)
    return str(folder)


def quiet_data_context() -> None:
    ray.data.DataContext.get_current().enable_progress_bars = False


def parallel_tokenizer() -> None:
    """Let the Rust tokenizer use the node's CPUs, as `prepare_worker` lets torch: the local cluster turns its
    threads off for every worker (forked trainers' data loaders would warn), which left a tokenizing actor one
    core where the in-process stage has the machine's; the encodings do not depend on it. Call before the
    first encode: the thread pool is sized then."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    os.environ["RAYON_NUM_THREADS"] = str(node_cpus())


# --- 1. the split, a Ray Data task per input file ---------------------------------------------------------------------


def fs_path(location: Path | str):
    """(pyarrow filesystem, path in it) of a local path or an object-storage URI."""
    return filesystem(str(location) if is_uri(location) else str(Path(location).resolve()))


def _text_output(location: str) -> io.TextIOWrapper:
    fs, path = fs_path(location)
    return io.TextIOWrapper(fs.open_output_stream(path), encoding="utf-8")


def _split_files(batch: dict, spec: JobSpec, parts: str) -> dict:
    """Ray Data task: each input file's documents, hash-split into two JSON-lines parts under `parts`, read with
    the local runner's readers. A malformed line (`on_error: raise`) comes back as the row's `error`, naming its
    file and line: an exception would reach the driver as Ray's, its message buried in a traceback."""
    from moedisco.stages.prepare import write_sides

    from moedisco.io import documents

    cfg, rows = spec.data, []
    for index, file in zip(batch["index"].tolist(), batch["file"].tolist()):
        report, counts, error, handles = documents.ReadReport(), {"train": 0, "eval": 0}, "", {}
        try:
            for name in counts:
                handles[name] = _text_output(join(parts, f"{index:06d}.{name}.jsonl"))
            texts = documents.read_file(file, cfg.format, cfg.text_field, cfg.on_error == "skip", report)
            write_sides(spec, (text for text in texts if text.strip()), handles, counts)
        except documents.DataError as failed:  # names its file (and line) already
            error = str(failed)
        except (OSError, ValueError) as failed:  # a part that cannot be written, a Parquet file that is not one
            error = f"{file}: {failed}"
        finally:
            for handle in handles.values():
                handle.close()
        rows.append({"index": index, **counts, "skipped": report.num_skipped, "error": error})
    return {name: np.array([row[name] for row in rows]) for name in rows[0]}


def split_parts(spec: JobSpec, files: list) -> list[dict]:
    """The Ray Data half of the split of a corpus of several files: a task per file writes its two parts under
    STORAGE/<job>/split/; returns each file's counts, in file order, or raises the first file's error."""
    from moedisco.io.documents import DataError

    parts = fresh(join(job_storage(spec), "split"))
    items = [{"index": index, "file": str(file)} for index, file in enumerate(files)]
    split = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _split_files, fn_kwargs={"spec": spec, "parts": parts}, batch_size=1, batch_format="numpy", num_cpus=1)
    rows = sorted(split.take_all(), key=lambda row: row["index"])
    if failed := next((row["error"] for row in rows if row["error"]), None):
        raise DataError(failed)  # the first in file order, as one reader would have stopped there
    if not sum(int(row["train"]) + int(row["eval"]) for row in rows):
        raise DataError(f"{spec.data.train}: no documents with text found")
    return rows


def join_split(spec: JobSpec, paths: JobPaths, rows: list[dict]) -> dict:
    """The other half, in one process: the parts joined in file order into data/{train,eval}.jsonl, the very files
    one reader writes, and `moedisco.stages.prepare.finish_split` (`data.eval`, the checks, the summary)."""
    from moedisco.stages.prepare import finish_split, split_partials

    parts = join(job_storage(spec), "split")
    counts = {name: sum(int(row[name]) for row in rows) for name in ("train", "eval")}
    skipped = sum(int(row["skipped"]) for row in rows)
    if skipped:
        log.warning("%s: skipped %d malformed records", spec.data.train, skipped)
    paths.data.mkdir(parents=True, exist_ok=True)
    handles = {name: path.open("w", encoding="utf-8") for name, path in split_partials(paths).items()}
    try:
        for row, name in itertools.product(rows, handles):  # each file's train part, then its held-out one
            part = open_input(join(parts, f"{int(row['index']):06d}.{name}.jsonl"))
            with io.TextIOWrapper(part, encoding="utf-8") as text:
                shutil.copyfileobj(text, handles[name], CHUNK_BYTES)
        summary = finish_split(spec, paths, handles, counts, skipped)
    finally:
        for handle in handles.values():
            handle.close()
    remove_tree(parts)
    return summary


def split_on_ray_data(spec: JobSpec, paths: JobPaths, files: list) -> dict:
    """`moedisco.stages.corpus`'s split of a corpus of several files, a task per file; returns the split's summary."""
    return join_split(spec, paths, split_parts(spec, files))


# --- 2. the train split as shards with document ids ----------------------------------------------------------------


def _read_marker(location: str | Path) -> dict | None:
    fs, path = fs_path(location)
    try:
        with fs.open_input_stream(path) as handle:
            return json.loads(handle.read())
    except (OSError, ValueError):  # missing, or cut short: index again
        return None


def _write_marker(location: str | Path, value: dict) -> None:
    fs, path = fs_path(location)
    with fs.open_output_stream(path) as handle:
        handle.write(json.dumps(value).encode())


def indexed(corpus: Path | str) -> dict | None:
    """An indexed corpus's marker: its "documents", and the "stamp" of what it was made from (train.jsonl's size
    and mtime, the shard size); None if the index is unfinished."""
    return _read_marker(join(corpus, INDEX_MARKER))


def index_corpus(train_jsonl: Path, out_dir: Path | str, rows_per_shard: int = ROWS_PER_SHARD) -> int:
    """Stream train.jsonl into Parquet shards of (doc_id, text), locally or on object storage, unless the shards
    of this very file are there already; returns the number of documents."""
    stat = train_jsonl.stat()
    stamp = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "rows_per_shard": rows_per_shard}
    if (done := indexed(out_dir)) is not None and done.get("stamp") == stamp:
        return int(done["documents"])
    out_dir = fresh(out_dir)
    num_docs = 0
    with train_jsonl.open() as handle:
        lines = (line for line in handle if line.strip())  # as moedisco.io.documents.iter_texts reads it
        while chunk := list(itertools.islice(lines, rows_per_shard)):
            texts = [json.loads(line)["text"] for line in chunk]
            doc_ids = np.arange(num_docs, num_docs + len(texts))
            shard = join(out_dir, SHARD_NAME.format(num_docs))
            pq.write_table(pa.table({"doc_id": doc_ids, "text": texts}), shard, **PARQUET_ARGS)
            num_docs += len(texts)
    _write_marker(join(out_dir, INDEX_MARKER), {"stamp": stamp, "documents": num_docs})  # last: the shards are whole
    return num_docs


def shard_ranges(corpus: Path | str, num_docs: int, keep_N: np.ndarray | None = None) -> list[dict]:
    """The shards of an indexed corpus in corpus order, as {"shard": location, "first": doc_id, "stop": doc_id};
    given `keep_N` (a flag per document), only the shards holding a document it keeps."""
    if is_uri(corpus):
        locations = list_files(str(corpus), (".parquet",))
    else:
        locations = [str(p) for p in Path(corpus).glob("*.parquet")]
    firsts = sorted((int(PurePosixPath(loc).stem.rsplit("-", 1)[1]), loc) for loc in locations)
    stops = [first for first, _ in firsts[1:]] + [num_docs]
    return [{"shard": loc, "first": first, "stop": stop} for (first, loc), stop in zip(firsts, stops)
            if keep_N is None or keep_N[first:stop].any()]


def shard_dataset(ranges: list[dict]) -> ray.data.Dataset:
    """The shards as a dataset of their locations, a block each: every actor reads its own shards. A Ray Data read
    task per shard had cost about 0.1 s of the 2 cores each, moving every text through the object store."""
    return ray.data.from_items(ranges, override_num_blocks=max(1, len(ranges)))


def through_actors(shards: list[dict], udf: type, kwargs: dict, num_cheap_nodes: int, options: dict,
                   shards_per_call: int = 1) -> tuple[ray.data.Dataset, int]:
    """`shards` through a fixed pool of `udf` actors, one per cheap node and no more than there are shards: the
    nodes it holds are what the stage costs. Returns the dataset and the pool's size."""
    num_actors = max(1, min(num_cheap_nodes, len(shards)))
    return shard_dataset(shards).map_batches(
        udf, fn_constructor_kwargs=kwargs, batch_size=max(1, min(shards_per_call, len(shards))),
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=num_actors), **options), num_actors


def read_shard(location: str, keep_N: np.ndarray | None = None) -> pa.Table:
    """A shard's (doc_id, text) rows, only those `keep_N` flags when given (on Arrow: no text is converted)."""
    table = pq.read_table(open_input(location, seekable=True), columns=["doc_id", "text"])
    return table if keep_N is None else table.filter(pa.array(keep_N[table["doc_id"].to_numpy()]))


# --- 3. tokenization on Ray Data --------------------------------------------------------------------------------------


class TokenizeBatches:
    """Ray Data actor UDF: each document's token ids, EOS appended, as one list column."""

    def __init__(self, tokenizer_json: str, eos: int, tier: TierConfig):
        from tokenizers import Tokenizer

        prepare_worker(tier)
        parallel_tokenizer()
        self.encoder, self.eos = Tokenizer.from_str(tokenizer_json), eos

    def __call__(self, batch: dict) -> pa.Table:
        from moedisco.io.token_shards import flat_ids

        table = pa.concat_tables([read_shard(location) for location in batch["shard"]])
        encodings = self.encoder.encode_batch_fast(table["text"].to_pylist(), add_special_tokens=False)
        flat, lengths = flat_ids([e.ids for e in encodings], eos=self.eos)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), type=pa.int64())
        return pa.table({"doc_id": table["doc_id"], "ids": pa.LargeListArray.from_arrays(offsets, pa.array(flat))})


def _tokenized(spec: JobSpec, corpus: str, tokenizer, num_docs: int, num_cheap_nodes: int) -> ray.data.Dataset:
    from moedisco.stages.prepare import fast_encoder

    tier = spec.resources.submodel_tier
    kwargs = {"tokenizer_json": fast_encoder(tokenizer).to_str(), "eos": tokenizer.eos_token_id, "tier": tier}
    options = {**task_options(spec, tier), "num_gpus": 0}  # the tier's nodes and CPUs; tokenizing needs no GPU
    return through_actors(shard_ranges(corpus, num_docs), TokenizeBatches, kwargs, num_cheap_nodes, options)[0]


def tokenize_on_ray_data(spec: JobSpec, corpus: str, tokenizer, folder: Path, num_docs: int,
                         num_cheap_nodes: int) -> None:
    """The token shard `folder` of the corpus shards under `corpus`, tokenized by an actor pool, in doc_id order."""
    from moedisco.io.token_shards import ShardWriter

    options = ray.data.DataContext.get_current().execution_options
    kept, options.preserve_order = options.preserve_order, True  # this process may run other stages later
    try:
        with ShardWriter(folder) as writer:
            next_doc = 0
            tokenized = _tokenized(spec, corpus, tokenizer, num_docs, num_cheap_nodes)
            for batch in tokenized.iter_batches(batch_size=None, batch_format="pyarrow"):
                doc_ids = batch["doc_id"].to_numpy()
                if not np.array_equal(doc_ids, np.arange(next_doc, next_doc + len(doc_ids))):
                    raise RuntimeError(f"{corpus}: Ray Data gave documents {doc_ids[0]}.. where {next_doc} was due")
                for ids in batch["ids"].chunks:
                    writer.add_flat(ids.flatten().to_numpy(), ids.value_lengths().to_numpy())
                next_doc += len(doc_ids)
            if next_doc != num_docs:  # raised inside the `with`: the writer aborts, no short shard is left done
                raise RuntimeError(f"{corpus}: {next_doc} documents tokenized of {num_docs}")
    finally:
        options.preserve_order = kept


def _sequential(spec: JobSpec, paths: JobPaths, rows_per_shard: int, parts: list[dict] | None) -> tuple[dict, int]:
    """Prepare's one-process work, in a task of one CPU: the split (joining `parts`, else one reader), the
    tokenizer, the held-out tokens, and either a small train split's tokens or the index of a larger one, which
    the actors tokenize next. Returns the split's summary and the documents left to tokenize (0: none)."""
    from moedisco.io.documents import iter_texts
    from moedisco.stages.prepare import split_and_tokenizer, write_tokens

    from moedisco.io.token_shards import is_complete

    parallel_tokenizer()  # the local cluster turns the tokenizer's threads off in every worker
    if parts is not None:
        join_split(spec, paths, parts)
    split, tokenizer = split_and_tokenizer(spec, paths)
    train, to_tokenize = paths.tokens("train"), 0
    if not is_complete(train) and split["train_documents"] <= rows_per_shard:
        write_tokens(iter_texts(paths.texts("train")), tokenizer, train)
    elif not is_complete(train):
        to_tokenize = index_corpus(paths.texts("train"), join(job_storage(spec), "corpus"), rows_per_shard)
    if not is_complete(paths.tokens("eval")):
        write_tokens(iter_texts(paths.texts("eval")), tokenizer, paths.tokens("eval"))
    return split, to_tokenize


def prepare_stage(spec: JobSpec, paths: JobPaths, num_cheap_nodes: int, rows_per_shard: int = ROWS_PER_SHARD) -> dict:
    """`moedisco.stages.prepare.stage_prepare`'s outputs and summary, the split of several files and the train split's
    tokens on Ray Data. This task coordinates (no CPU of its own, as the embed and cluster stages): the work of one
    process runs in a task of one CPU (`_sequential`) that has ended before the tokenizing actors ask for theirs."""
    from moedisco.stages.prepare import prepared

    from moedisco.io.documents import corpus_files
    from moedisco.io.token_shards import TokenShard
    from moedisco.stages.prepare import load_tokenizer

    quiet_data_context()
    started, parts = time.perf_counter(), None
    # `data.max_documents` counts documents across the files in order: one reader for that.
    if not paths.split_summary.is_file() and spec.data.max_documents is None:
        if len(files := corpus_files(spec.data.train)) > 1:
            parts = split_parts(spec, files)
    task = ray.remote(_sequential).options(num_cpus=1)
    split, to_tokenize = ray.get(task.remote(spec, paths, rows_per_shard, parts))
    sequential_seconds = time.perf_counter() - started
    tokenizer, train = load_tokenizer(paths.tokenizer), paths.tokens("train")
    if to_tokenize:
        corpus = join(job_storage(spec), "corpus")  # the embed stage reads the same shards
        tokenize_on_ray_data(spec, str(corpus), tokenizer, train, to_tokenize, num_cheap_nodes)
    if (tokenized := TokenShard.load(train).num_documents) != split["train_documents"]:
        raise RuntimeError(f"{train}: {tokenized} documents tokenized of the split's {split['train_documents']}")
    return {**prepared(paths, split, tokenizer), "split_tasks": len(parts or ()), "tokenized_on_ray_data": to_tokenize,
            "sequential_seconds": sequential_seconds, "seconds": time.perf_counter() - started}
