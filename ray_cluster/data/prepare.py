"""The prepare stage on Ray Data: the split of a corpus of several files a task per file, the train split tokenized
by an actor pool that grows over the CPU tier's nodes (`resources.cpu_tier`: CPU work rents no GPU pod).

    summary = prepare_stage(spec, paths, max_nodes=2)   # OUTPUT/data/ as moedisco's stage_prepare writes it,
                                                        # and STORAGE/<job>/corpus/ (`ray_cluster.data.shards`)

The stage's own task only coordinates. The split (a corpus of several files and no `data.max_documents`, which
counts across files in order: a Ray Data task per file writes two JSON-lines parts to storage, joined in file order
into the very OUTPUT/data/{train,eval}.jsonl one reader writes; otherwise the local runner's one reader), the
tokenizer, the held-out tokens and the train split's index run in one task of one CPU of the CPU tier
(`_sequential`). A train
split of more than one shard is then tokenized by `TokenizeBatches` actors (the job's Rust tokenizer, given as its
JSON so no node reads OUTPUT), Ray Data keeping the shards' order, and appended batch by batch to the train token
shard: neither texts nor tokens are ever held whole, and the ids are the local runner's, document for document. A
train split of one shard is tokenized in the one-CPU task and not indexed (the embed stage indexes it). Every task
and actor that holds a node's CPU says so through `reporter` (`node_uses.NodeUseReporter`); the actors only as they
start, the driver closing their uses when the stage's result arrives.
"""

from __future__ import annotations

import io
import itertools
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import ray
import ray.data

from moedisco.config.resources import TierConfig
from moedisco.config.spec import JobSpec
from moedisco.io.storage import join, open_input, remove_tree
from ray_cluster.data.shards import (
    fresh,
    fs_path,
    index_corpus,
    parallel_tokenizer,
    quiet_data_context,
    read_shard,
    shard_ranges,
    through_actors,
)
from ray_cluster.node_uses import SILENT, NodeUseReporter
from ray_cluster.placement import job_storage, prepare_worker, task_options

if TYPE_CHECKING:
    from moedisco.job.layout import JobPaths

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20


# --- 1. the split, a Ray Data task per input file ---------------------------------------------------------------------


def _text_output(location: str) -> io.TextIOWrapper:
    fs, path = fs_path(location)
    return io.TextIOWrapper(fs.open_output_stream(path), encoding="utf-8")


def _split_files(batch: dict, spec: JobSpec, parts: str, reporter: NodeUseReporter) -> dict:
    """Ray Data task: each input file's documents, hash-split into two JSON-lines parts under `parts`, read with
    the local runner's readers. A malformed line (`on_error: raise`) comes back as the row's `error`, naming its
    file and line: an exception would reach the driver as Ray's, its message buried in a traceback."""
    with reporter.held():
        return _split_batch(batch, spec, parts)


def _split_batch(batch: dict, spec: JobSpec, parts: str) -> dict:
    from moedisco.io import documents
    from moedisco.stages.prepare import domain_field, write_sides

    cfg, rows = spec.data, []
    for index, file in zip(batch["index"].tolist(), batch["file"].tolist()):
        report, counts, error, handles = documents.ReadReport(), {"train": 0, "eval": 0}, "", {}
        try:
            for name in counts:
                handles[name] = _text_output(join(parts, f"{index:06d}.{name}.jsonl"))
            docs = documents.read_records(file, cfg.format, cfg.text_field, cfg.on_error == "skip", report,
                                          domain_field(spec))
            write_sides(spec, (doc for doc in docs if doc.text.strip()), handles, counts)
        except documents.DataError as failed:  # names its file (and line) already
            error = str(failed)
        except (OSError, ValueError) as failed:  # a part that cannot be written, a Parquet file that is not one
            error = f"{file}: {failed}"
        finally:
            for handle in handles.values():
                handle.close()
        rows.append({"index": index, **counts, "skipped": report.num_skipped, "error": error})
    return {name: np.array([row[name] for row in rows]) for name in rows[0]}


def split_parts(spec: JobSpec, files: list, reporter: NodeUseReporter = SILENT) -> list[dict]:
    """The Ray Data half of the split of a corpus of several files: a task per file writes its two parts under
    STORAGE/<job>/split/; returns each file's counts, in file order, or raises the first file's error."""
    from moedisco.io.documents import DataError

    parts = fresh(join(job_storage(spec), "split"))
    items = [{"index": index, "file": str(file)} for index, file in enumerate(files)]
    split = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _split_files, fn_kwargs={"spec": spec, "parts": parts, "reporter": reporter}, batch_size=1,
        batch_format="numpy", **task_options(spec, spec.resources.cpu_tier))
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


# --- 2. tokenization on Ray Data --------------------------------------------------------------------------------------


class TokenizeBatches:
    """Ray Data actor UDF: each document's token ids, EOS appended, as one list column."""

    def __init__(self, tokenizer_json: str, eos: int, tier: TierConfig, reporter: NodeUseReporter):
        reporter.open()  # closed by the driver with the stage: Ray Data ends the pool's actors without a word
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


def _tokenized(spec: JobSpec, corpus: str, tokenizer, num_docs: int, max_nodes: int,
               reporter: NodeUseReporter) -> ray.data.Dataset:
    from moedisco.stages.prepare import fast_encoder

    tier = spec.resources.cpu_tier
    kwargs = {"tokenizer_json": fast_encoder(tokenizer).to_str(), "eos": tokenizer.eos_token_id, "tier": tier,
              "reporter": reporter}
    options = task_options(spec, tier)
    return through_actors(shard_ranges(corpus, num_docs), TokenizeBatches, kwargs, max_nodes, options)[0]


def tokenize_on_ray_data(spec: JobSpec, corpus: str, tokenizer, folder: Path, num_docs: int,
                         max_nodes: int, reporter: NodeUseReporter = SILENT) -> None:
    """The token shard `folder` of the corpus shards under `corpus`, tokenized by an actor pool, in doc_id order."""
    from moedisco.io.token_shards import TokenShardWriter

    options = ray.data.DataContext.get_current().execution_options
    kept, options.preserve_order = options.preserve_order, True  # this process may run other stages later
    try:
        with TokenShardWriter(folder) as writer:
            next_doc = 0
            tokenized = _tokenized(spec, corpus, tokenizer, num_docs, max_nodes, reporter)
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


# --- 3. the stage: one-process work in a one-CPU task, then the actors ------------------------------------------------


def _sequential(spec: JobSpec, paths: JobPaths, parts: list[dict] | None,
                reporter: NodeUseReporter) -> tuple[dict, int]:
    """Prepare's one-process work, in a task of one CPU: the split (joining `parts`, else one reader), the
    tokenizer, the held-out tokens, and either a small train split's tokens or the index of a larger one, which
    the actors tokenize next. Returns the split's summary and the documents left to tokenize (0: none)."""
    with reporter.held():
        return _sequential_work(spec, paths, parts)


def _sequential_work(spec: JobSpec, paths: JobPaths, parts: list[dict] | None) -> tuple[dict, int]:
    from moedisco.io.documents import iter_texts
    from moedisco.io.token_shards import is_complete
    from moedisco.stages.prepare import split_and_tokenizer, write_tokens

    parallel_tokenizer()  # the local cluster turns the tokenizer's threads off in every worker
    if parts is not None:
        join_split(spec, paths, parts)
    split, tokenizer = split_and_tokenizer(spec, paths)
    train, to_tokenize = paths.tokens("train"), 0
    rows_per_shard = spec.data.rows_per_shard
    if not is_complete(train) and split["train_documents"] <= rows_per_shard:
        write_tokens(iter_texts(paths.texts("train")), tokenizer, train)
    elif not is_complete(train):
        to_tokenize = index_corpus(paths.texts("train"), join(job_storage(spec), "corpus"), rows_per_shard)
    if not is_complete(paths.tokens("eval")):
        write_tokens(iter_texts(paths.texts("eval")), tokenizer, paths.tokens("eval"))
    return split, to_tokenize


def prepare_stage(spec: JobSpec, paths: JobPaths, max_nodes: int,
                  reporter: NodeUseReporter = SILENT) -> dict:
    """`moedisco.stages.prepare.stage_prepare`'s outputs and summary, the split of several files and the train split's
    tokens on Ray Data. This task coordinates (no CPU of its own, as the embed and cluster stages): the work of one
    process runs in a task of one CPU (`_sequential`) that has ended before the tokenizing actors ask for theirs."""
    from moedisco.io.documents import corpus_files
    from moedisco.io.token_shards import TokenShard
    from moedisco.stages.prepare import load_tokenizer, prepared

    quiet_data_context()
    started, parts = time.perf_counter(), None
    # `data.max_documents` counts documents across the files in order: one reader for that.
    if not paths.split_summary.is_file() and spec.data.max_documents is None:
        if len(files := corpus_files(spec.data.train)) > 1:
            parts = split_parts(spec, files, reporter)
    task = ray.remote(_sequential).options(**task_options(spec, spec.resources.cpu_tier))
    split, to_tokenize = ray.get(task.remote(spec, paths, parts, reporter))
    sequential_seconds = time.perf_counter() - started
    tokenizer, train = load_tokenizer(paths.tokenizer), paths.tokens("train")
    if to_tokenize:
        corpus = join(job_storage(spec), "corpus")  # the embed stage reads the same shards
        tokenize_on_ray_data(spec, str(corpus), tokenizer, train, to_tokenize, max_nodes, reporter)
    if (tokenized := TokenShard.load(train).num_documents) != split["train_documents"]:
        raise RuntimeError(f"{train}: {tokenized} documents tokenized of the split's {split['train_documents']}")
    return {**prepared(paths, split, tokenizer), "split_tasks": len(parts or ()), "tokenized_on_ray_data": to_tokenize,
            "sequential_seconds": sequential_seconds, "seconds": time.perf_counter() - started}
