"""The streaming data path, in this process: the prepare, embed and cluster stages, and what training reads.

    stage_prepare(run)   # read -> hash split -> data/{train,eval}.jsonl -> tokenizer (bounded sample) -> token shards
    stage_embed(run)     # train.jsonl, a chunk at a time -> embed/embeddings.npy (read later as a memory map)
    stage_cluster(run)   # k-means on a bounded sample -> every document's cluster -> cluster/tokens_<k>/ shards
    source = train_source(spec, paths, expert=2)   # cluster 2's sequences, read by (seed, step) from its shard

No step holds the corpus, its tokens or all of its embeddings in memory: documents stream from the input files to
the split's JSON lines, then a chunk (`CHUNK_DOCUMENTS`) at a time into the token shards (`moedisco.shards`) and
the embedding matrix, written a chunk at a time at its place in the .npy file. Each piece is finished atomically,
and a stage interrupted half-way resumes from the pieces that are finished: the split, the tokenizer, each token
shard, the embedded rows (`embed/progress.json`) and each cluster's shard.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from moedisco import cluster, data, embed
from moedisco.config import JobSpec
from moedisco.layout import JobPaths, write_atomically
from moedisco.shards import RowFile, SequenceSource, ShardWriter, TokenShard, is_complete
from moedisco.stage_run import StageRun

CHUNK_DOCUMENTS = 4096  # documents tokenized or embedded at a time: a few MB of text


def iter_texts(path: Path, skip: int = 0) -> Iterator[str]:
    """The documents of a split's JSON lines, one at a time; the first `skip` are passed over unparsed."""
    with path.open(encoding="utf-8") as handle:
        for line in itertools.islice((line for line in handle if line.strip()), skip, None):
            yield json.loads(line)["text"]


def load_texts(path: Path) -> list[str]:
    return list(iter_texts(path))


def chunks(items: Iterator, size: int = CHUNK_DOCUMENTS) -> Iterator[list]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


# --- prepare ------------------------------------------------------------------------------------------------------


def side_of(spec: JobSpec, text: str) -> str:
    """The split a document of `data.train` falls in: the hash split, unless `data.eval` is the held-out set."""
    cfg = spec.data
    return "eval" if cfg.eval is None and data.is_held_out(text, cfg.eval_fraction, spec.seed) else "train"


def write_sides(spec: JobSpec, texts: Iterator[str], handles: dict, counts: dict, sample: list | None = None) -> None:
    """Each document as a JSON line to its side's handle; the first `tokenizer.sample_documents` train documents
    also to `sample`."""
    for text in texts:
        name = side_of(spec, text)
        handles[name].write(json.dumps({"text": text}) + "\n")
        counts[name] += 1
        if sample is not None and name == "train" and len(sample) < spec.tokenizer.sample_documents:
            sample.append(text)


def split_partials(paths: JobPaths) -> dict[str, Path]:
    return {name: paths.texts(name).with_suffix(".jsonl.partial") for name in ("train", "eval")}


def finish_split(spec: JobSpec, paths: JobPaths, handles: dict, counts: dict, skipped: int) -> dict:
    """After `data.train`'s documents: `data.eval`'s to the held-out side, the checks, the files renamed into
    place and the split's summary written (an interrupted split leaves only .partial files)."""
    cfg = spec.data
    for text in data.iter_documents(cfg.eval, cfg) if cfg.eval is not None else ():
        handles["eval"].write(json.dumps({"text": text}) + "\n")
        counts["eval"] += 1
    for handle in handles.values():
        handle.close()
    if counts["train"] == 0 or (counts["eval"] == 0 and cfg.eval_fraction > 0):
        empty = "train" if counts["train"] == 0 else "held-out"
        raise data.DataError(f"{cfg.train}: no document of its {counts['train'] + counts['eval']} fell in the "
                             f"{empty} split (data.eval_fraction = {cfg.eval_fraction}); give data.eval or more "
                             "documents")
    for name, path in split_partials(paths).items():
        path.replace(paths.texts(name))
    summary = {"train_documents": counts["train"], "eval_documents": counts["eval"], "skipped": skipped}
    write_atomically(paths.split_summary, json.dumps(summary))
    return summary


def _write_split(spec: JobSpec, paths: JobPaths) -> dict:
    """Stream the input into data/{train,eval}.jsonl; returns the split's counts and the tokenizer's sample."""
    report, counts, sample = data.ReadReport(), {"train": 0, "eval": 0}, []
    handles = {name: path.open("w", encoding="utf-8") for name, path in split_partials(paths).items()}
    try:
        write_sides(spec, data.iter_documents(spec.data.train, spec.data, report), handles, counts, sample)
        summary = finish_split(spec, paths, handles, counts, report.num_skipped)
    finally:
        for handle in handles.values():
            handle.close()
    return {**summary, "sample": sample}


def _tokenizer(spec: JobSpec, paths: JobPaths, sample: list[str] | None):
    if (paths.tokenizer / "tokenizer.json").is_file():
        return data.load_tokenizer(paths.tokenizer)
    if spec.tokenizer.path:
        tokenizer = data.load_tokenizer(spec.tokenizer.path)
    else:
        if sample is None:  # the split was finished by an earlier, interrupted run
            sample = list(itertools.islice(iter_texts(paths.texts("train")), spec.tokenizer.sample_documents))
        tokenizer = data.train_tokenizer(sample, spec.tokenizer)
    partial = paths.tokenizer.with_name("tokenizer.partial")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(paths.tokenizer, ignore_errors=True)
    partial.rename(paths.tokenizer)
    return tokenizer


def fast_encoder(tokenizer) -> Tokenizer:
    """The Rust tokenizer itself, without truncation or padding: with `encode_batch_fast` (no offsets), the same
    ids as `tokenizer(chunk)`, at twice its rate."""
    backend = tokenizer.backend_tokenizer
    if backend.truncation or backend.padding:
        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation(), backend.no_padding()
    return backend


def write_tokens(texts: Iterator[str], tokenizer, folder: Path) -> TokenShard:
    """Tokenize `texts` a chunk at a time into the shard `folder` (each document ends with EOS)."""
    eos, backend = tokenizer.eos_token_id, fast_encoder(tokenizer)
    with ShardWriter(folder) as writer:
        for chunk in chunks(texts):
            writer.add([e.ids for e in backend.encode_batch_fast(chunk, add_special_tokens=False)], eos=eos)
    return TokenShard.load(folder)


def split_and_tokenizer(spec: JobSpec, paths: JobPaths) -> tuple[dict, object]:
    """Prepare's first half: the split's counts and the tokenizer, each as an earlier run left it or made now."""
    paths.data.mkdir(parents=True, exist_ok=True)
    if paths.split_summary.is_file():
        split, sample = json.loads(paths.split_summary.read_text()), None
    else:
        split = _write_split(spec, paths)
        sample = split.pop("sample")
    return split, _tokenizer(spec, paths, sample)


def prepared(paths: JobPaths, split: dict, tokenizer) -> dict:
    """The prepare stage's summary, once its token shards are written."""
    return {**split, "vocab_size": len(tokenizer), "train_tokens": TokenShard.load(paths.tokens("train")).num_tokens}


def stage_prepare(run: StageRun) -> dict:
    """Read, hash-split, tokenize. Writes data/{train,eval}.jsonl, data/tokenizer/, data/{train,eval}_tokens/."""
    split, tokenizer = split_and_tokenizer(run.spec, run.paths)
    for name in ("train", "eval"):
        if not is_complete(run.paths.tokens(name)):
            write_tokens(iter_texts(run.paths.texts(name)), tokenizer, run.paths.tokens(name))
    return prepared(run.paths, split, tokenizer)


# --- embed --------------------------------------------------------------------------------------------------------


def _embedded_rows(paths: JobPaths, num_docs: int, dim: int) -> int:
    """Rows of embed/embeddings.npy already written by an interrupted run of this job (0: start over)."""
    try:
        progress = json.loads(paths.embed_progress.read_text())
    except (OSError, ValueError):
        return 0
    same = progress.get("documents") == num_docs and progress.get("dim") == dim and paths.embeddings.is_file()
    return int(progress["rows"]) if same else 0


def stage_embed(run: StageRun) -> dict:
    """Embed the train split a chunk at a time into embed/embeddings.npy, resuming after its last written chunk."""
    spec, paths = run.spec, run.paths
    started = time.perf_counter()
    num_docs = TokenShard.load(paths.tokens("train")).num_documents
    embedder = embed.Embedder(spec.embed)
    done = _embedded_rows(paths, num_docs, embedder.dim)
    paths.embeddings.parent.mkdir(parents=True, exist_ok=True)
    if not done:  # the .npy header and a sparse file of the full size
        np.lib.format.open_memmap(paths.embeddings, mode="w+", dtype=np.float32, shape=(num_docs, embedder.dim)).flush()
    offset, row_bytes = np.load(paths.embeddings, mmap_mode="r").offset, embedder.dim * 4
    row = done
    # Written through the file, not a memory map: mapped pages written would count in the process's resident
    # memory until the kernel reclaims them, 1.5 GB at 1M documents.
    with paths.embeddings.open("r+b") as handle:
        for chunk in chunks(iter_texts(paths.texts("train"), skip=done)):
            handle.seek(offset + row * row_bytes)
            handle.write(np.ascontiguousarray(embedder(chunk), dtype=np.float32).tobytes())
            handle.flush()  # the rows are on disk before the progress file says so
            row += len(chunk)
            write_atomically(paths.embed_progress,
                             json.dumps({"rows": row, "documents": num_docs, "dim": embedder.dim}))
    seconds = time.perf_counter() - started
    run.metrics.write({"stage": "embed", "step": num_docs, "documents": num_docs, "seconds": seconds,
                       "device": str(embed.resolve_device(spec.embed.device))})
    return {"documents": num_docs, "dim": embedder.dim, "resumed_from": done, "seconds": seconds}


# --- cluster ------------------------------------------------------------------------------------------------------


def _clusters(spec: JobSpec, paths: JobPaths) -> tuple[cluster.ClusterResult, bool]:
    """The job's clusters: those already saved for this corpus, else a fit now (which voids the old shards)."""
    vectors_ND = RowFile(paths.embeddings)  # one pass, through the file: no 1.5 GB of mapped pages at 1M
    if (paths.clusters / "clusters.json").is_file():
        saved = cluster.ClusterResult.load(paths.clusters)
        if len(saved.assignments) == len(vectors_ND) and len(saved.centroids) == spec.model.num_experts:
            return saved, False
    result = cluster.fit_streaming(vectors_ND, spec.cluster, spec.model.num_experts, spec.seed)
    save_clusters(spec, paths, result)
    return result, True


def save_clusters(spec: JobSpec, paths: JobPaths, result: cluster.ClusterResult) -> None:
    """Save the job's clusters (both runners). The per-cluster token shards and the held-out documents' clusters
    cached for other clusters go first: both are reused for as long as they exist (`cluster_shard`,
    `moedisco.pipeline.eval_assignments`)."""
    try:
        old = cluster.ClusterResult.load(paths.clusters)
    except (OSError, ValueError, KeyError, EOFError):  # no clusters saved yet, or a save cut short
        old = None
    same = old is not None and np.array_equal(old.assignments, result.assignments) and np.array_equal(
        old.centroids, result.centroids)
    if not same:
        for expert in range(spec.model.num_experts):
            shutil.rmtree(paths.cluster_tokens(expert), ignore_errors=True)
        (paths.clusters / "eval_assignments.npy").unlink(missing_ok=True)
    result.save(paths.clusters)


def write_cluster_tokens(paths: JobPaths, assignments: np.ndarray, expert: int) -> TokenShard:
    """Cluster `expert`'s documents, in corpus order, copied from the train shard into cluster/tokens_<expert>/."""
    train = TokenShard.load(paths.tokens("train"))
    with ShardWriter(paths.cluster_tokens(expert)) as writer:
        for tokens, lengths in train.select(np.flatnonzero(assignments == expert)):
            writer.add_flat(tokens, lengths)
    return TokenShard.load(paths.cluster_tokens(expert))


def stage_cluster(run: StageRun) -> dict:
    spec, paths = run.spec, run.paths
    started = time.perf_counter()
    result, fitted = _clusters(spec, paths)
    written = [k for k in range(spec.model.num_experts) if not is_complete(paths.cluster_tokens(k))]
    for expert in written:
        write_cluster_tokens(paths, result.assignments, expert)
    seconds = time.perf_counter() - started
    run.metrics.write({"stage": "cluster", "step": 0, "sizes": result.sizes, "inertia": result.inertia,
                       "seconds": seconds, "device": "cpu"})
    return {"sizes": result.sizes, "inertia": result.inertia, "method": result.method, "fitted": fitted,
            "shards_written": written, "seconds": seconds}


# --- what training reads ------------------------------------------------------------------------------------------


def cluster_shard(paths: JobPaths, expert: int) -> TokenShard:
    """Cluster `expert`'s token shard, made from the saved assignments if the cluster stage did not (the Ray
    runner's cluster stage saves only the assignments)."""
    if not is_complete(paths.cluster_tokens(expert)):
        # Written under a name of its own and renamed: each submodel trainer makes only its own cluster's shard.
        write_cluster_tokens(paths, cluster.ClusterResult.load(paths.clusters).assignments, expert)
    return TokenShard.load(paths.cluster_tokens(expert))


def train_source(spec: JobSpec, paths: JobPaths, expert: int | None = None) -> SequenceSource:
    """The training sequences of cluster `expert` (None: the whole train split), read from their shard."""
    shard = TokenShard.load(paths.tokens("train")) if expert is None else cluster_shard(paths, expert)
    return SequenceSource(shard, spec.data.sequence_length)
