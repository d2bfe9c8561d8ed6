"""The data stage on Ray Data: embed the corpus with an actor pool on the cheap tier, cluster it, shard it per expert.

    embed_summary = embed_stage(spec, paths, num_actors=2)        # STORAGE/<job>/embeddings/*.parquet
    cluster_summary = cluster_stage(spec, paths)                  # OUTPUT/cluster/ + STORAGE/<job>/clusters/cluster=k/

1. The prepare stage's OUTPUT/data/train.jsonl is streamed into Parquet shards with an explicit `doc_id` (its line),
   so document order, and therefore every later index into the cluster assignments, matches the local runner.
2. `map_batches` over an `ActorPoolStrategy` pool pinned to the cheap tier embeds the shards; each actor loads the
   embedding model once (`moedisco.embed.Embedder`).
3. k-means is fitted with `moedisco.cluster.fit_clusters` on the embeddings of at most `max_fit_documents` documents
   (all of them when the corpus is that small, else a uniform `random_sample`), streamed in with `iter_batches`. A
   sample this size gives centroids whose objective on the full corpus is within a few percent of a full fit, and
   keeps the paper's exact algorithm (k-means++ and `n_init` restarts) instead of mini-batch k-means.
4. A second `map_batches` assigns every document: by the fit itself when it saw every document (identical to the
   local runner, for every `cluster.method`), else to its nearest centroid. The rows are written as one Parquet shard
   set per cluster (hive partitions `cluster=k`), and only the small (doc_id, cluster, distance) columns are read back
   to save OUTPUT/cluster/ in `ClusterResult` form, which `stage_submodel` uses unchanged.
No step holds the corpus text, or all its embeddings beyond the fit sample, in one process.

What of the streaming data path runs on Ray Data, and what does not (the Ray runner's data stages are separate
stages, each writing its output to storage before the next starts: two Ray Data datasets, not one pipeline):
- read, hash split, tokenizer on a bounded sample, tokenize: `moedisco.corpus.stage_prepare` as the local runner
  runs it, in one Ray task (streaming, bounded memory), not Ray Data;
- step 1 (train.jsonl -> Parquet with `doc_id`): one process, streaming, not Ray Data;
- step 2, embed: Ray Data (actor pool on the cheap tier, streaming Parquet writes);
- step 3, the k-means fit: one Ray task on the sample (read through Ray Data's `iter_batches`);
- step 4, assign and write per-cluster Parquet (the texts): Ray Data;
- the per-cluster token shards training reads: not Ray Data; each submodel trainer copies its own cluster's rows
  from the train token shard, by the saved assignments (`moedisco.corpus.cluster_shard`).
Each embedding actor freezes the objects its imports and model leave (`gc.freeze`), so the `gc.collect` Ray runs
in every worker when the object store fills no longer holds the GIL for 0.3 s a time, and runs the Rust tokenizer
on its node's CPUs (`parallel_tokenizer`). At 1M documents on 2 cores, with 1 GB of object store a node (in 150 MB
Ray Data's backpressure held it to 0.45x), one worker reaches 0.75-0.76x the in-process rate, start-up amortised.

A corpus of at most one shard (`ROWS_PER_SHARD` documents), which Ray Data would embed with a single actor anyway,
skips Ray Data: `ray_cluster.prestart.DataWorker`, one actor on the cheap tier, runs the job's data stages in one
process (`embed_in_process`, `cluster_in_process`, and prepare and source as they are) and writes the same shards
and OUTPUT files. Ray Data's start-up (listing and footer-reader tasks and actors, stats and autoscaling actors, the
actor pool, each a fresh process importing its libraries) cost the tiny example 20 s per stage on two cores; in
one process the imports and the embedding model are loaded once. The fit sees every document and assigns by the
fit itself, as step 4 does for a corpus this size, so both paths give the same clusters.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
import ray.data

from moedisco import cluster
from moedisco.config import EmbedConfig, JobSpec, TierConfig
from moedisco.metrics import MetricsWriter
from moedisco.storage import join, make_dir, remove_tree
from ray_cluster.placement import (job_storage, label_selector, node_cpus, prepare_worker, task_options,
                                   tier_simulated)

if TYPE_CHECKING:
    from moedisco.layout import JobPaths

MAX_FIT_DOCUMENTS = cluster.MAX_FIT_DOCUMENTS  # one bound for both runners
ROWS_PER_SHARD = 4096


def _fresh(folder: Path | str) -> str:
    # A stage interrupted half-way left partial files; a re-run rewrites the folder whole.
    remove_tree(folder)
    make_dir(folder)
    return str(folder)


def _quiet_data_context() -> None:
    ray.data.DataContext.get_current().enable_progress_bars = False


# Parquet's dictionary encoding is tried on every column and given up on for unique texts and float vectors; it
# had doubled the time of each shard's write.
PARQUET_ARGS = {"use_dictionary": False}


def parallel_tokenizer() -> None:
    """Let the Rust tokenizer use the node's CPUs, as `prepare_worker` lets torch: the local cluster turns its
    threads off for every worker (forked trainers' data loaders would warn), which left the embedding actor one
    core where the in-process embedder has the machine's; the encodings do not depend on it. Call before the
    first encode: the thread pool is sized then."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    os.environ["RAYON_NUM_THREADS"] = str(node_cpus())


# --- 1. corpus with document ids ----------------------------------------------------------------------------------


def index_corpus(train_jsonl: Path, out_dir: Path | str, rows_per_shard: int = ROWS_PER_SHARD) -> int:
    """Stream train.jsonl into Parquet shards of (doc_id, text), locally or on object storage; returns the number
    of documents."""
    out_dir = _fresh(out_dir)
    num_docs = 0
    with train_jsonl.open() as handle:
        lines = (line for line in handle if line.strip())  # as moedisco.pipeline.load_texts reads it
        while chunk := list(itertools.islice(lines, rows_per_shard)):
            texts = [json.loads(line)["text"] for line in chunk]
            doc_ids = np.arange(num_docs, num_docs + len(texts))
            shard = join(out_dir, f"corpus-{num_docs:010d}.parquet")
            pq.write_table(pa.table({"doc_id": doc_ids, "text": texts}), shard, **PARQUET_ARGS)
            num_docs += len(texts)
    return num_docs


# --- 2. embeddings ------------------------------------------------------------------------------------------------


class EmbedBatches:
    """Ray Data actor UDF: the embedding model is loaded once per actor, in `__init__`."""

    def __init__(self, cfg: EmbedConfig, tier: TierConfig):
        from moedisco.embed import Embedder  # transformers: only the embedding actors need it

        prepare_worker(tier)
        parallel_tokenizer()
        self.embedder = Embedder(cfg)
        # Ray has every worker run a full `gc.collect` whenever its object store fills; over the ~500k objects
        # that torch and transformers leave, each took the GIL from the embedding for 0.3 s or more. Frozen, they
        # are never scanned again; they live as long as the actor anyway.
        gc.freeze()

    def __call__(self, batch: dict) -> dict:
        vectors_BD = self.embedder(list(batch["text"]))
        return {"doc_id": batch["doc_id"], "text": batch["text"], "embedding": vectors_BD}


def _embedded(spec: JobSpec, paths: JobPaths, num_docs: int, started: float, device: str, num_nodes: int,
              index_seconds: float) -> dict:
    seconds = time.perf_counter() - started
    summary = {"documents": num_docs, "seconds": seconds, "index_seconds": index_seconds, "device": device,
               "num_nodes": num_nodes}
    MetricsWriter(paths.metrics).write({"stage": "embed", "step": num_docs, **summary})
    return summary


def embed_stage(spec: JobSpec, paths: JobPaths, num_cheap_nodes: int) -> dict:
    """Index and embed the train split on the cheap tier; embeddings land in STORAGE/<job>/embeddings/."""
    _quiet_data_context()
    started = time.perf_counter()
    storage, tier = job_storage(spec), spec.resources.submodel_tier
    num_docs = index_corpus(paths.texts("train"), join(storage, "corpus"))
    index_seconds = time.perf_counter() - started
    # A fixed pool, one actor per cheap node, no larger than there are shards to embed: the nodes it holds are
    # what the stage costs.
    num_actors = max(1, min(num_cheap_nodes, -(-num_docs // ROWS_PER_SHARD)))
    options = task_options(spec, tier)
    embedded = ray.data.read_parquet(str(join(storage, "corpus"))).map_batches(
        # A shard per call, as the in-process stage embeds a chunk per call: Ray Data's per-batch work (Arrow to
        # NumPy and back, a task round trip) on `embed.batch_size` = 64 documents cost more than the embedding;
        # the embedder still runs an encoder in batches of `embed.batch_size` itself.
        EmbedBatches, fn_constructor_kwargs={"cfg": spec.embed, "tier": tier}, batch_size=ROWS_PER_SHARD,
        compute=ray.data.ActorPoolStrategy(size=num_actors), **options)
    embedded.write_parquet(_fresh(join(storage, "embeddings")), **PARQUET_ARGS)
    on_gpu = options["num_gpus"] > 0 and not tier_simulated(spec, tier)
    return _embedded(spec, paths, num_docs, started, "cuda" if on_gpu else "cpu", num_actors, index_seconds)


# --- 3. k-means on the embeddings (a sample once the corpus is large) -----------------------------------------------


def read_embeddings(embeddings_dir: Path | str, max_documents: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(doc_ids, vectors_ND) of every document, or of a uniform sample of about `max_documents`; and the total."""
    ds = ray.data.read_parquet(str(embeddings_dir)).select_columns(["doc_id", "embedding"])
    num_docs = count_rows(embeddings_dir)
    if num_docs > max_documents:
        ds = ds.random_sample(max_documents / num_docs, seed=seed)
    doc_ids, vectors = [], []
    for batch in ds.iter_batches(batch_size=4096, batch_format="numpy"):
        doc_ids.append(batch["doc_id"]), vectors.append(batch["embedding"])
    doc_ids_N = np.concatenate(doc_ids)
    order = np.argsort(doc_ids_N, kind="stable")  # the fit sees documents in corpus order, as in process
    return doc_ids_N[order], np.concatenate(vectors)[order], num_docs


def fit_on_sample(spec: JobSpec, embeddings_dir: Path | str, max_documents: int) -> tuple[cluster.ClusterResult, bool]:
    """Fit the spec's clustering on (a sample of) the embeddings; True when the fit saw every document."""
    doc_ids, vectors_ND, num_docs = read_embeddings(embeddings_dir, max_documents, spec.seed)
    covers_all = len(doc_ids) == num_docs
    if not covers_all and spec.cluster.method == "random":
        raise ValueError(f"cluster.method=random needs every document in one fit; the corpus has {num_docs} "
                         f"documents, more than the {max_documents} the Ray runner fits at once")
    return cluster.fit_clusters(vectors_ND, spec.cluster, spec.model.num_experts, spec.seed), covers_all


# --- 4. assignment and per-cluster shards -----------------------------------------------------------------------------


def assign_batch(batch: dict, result: cluster.ClusterResult, fitted: np.ndarray | None) -> dict:
    """Cluster of each document (from the fit when it saw all of them) and its squared distance to the centroid."""
    vectors_BD = cluster.prepare_vectors(batch["embedding"], result.normalize)  # the same geometry the fit used
    assignments_B = fitted[batch["doc_id"]] if fitted is not None else result.assign(batch["embedding"])
    sq_distance_B = ((vectors_BD - result.centroids[assignments_B]) ** 2).sum(1)
    return {"doc_id": batch["doc_id"], "text": batch["text"], "cluster": assignments_B, "sq_distance": sq_distance_B}


def collect_assignments(shards_dir: Path | str, num_docs: int) -> tuple[np.ndarray, float]:
    """The small per-document columns of the shards: assignments [num_docs] (int64) and the k-means objective.

    Read with pyarrow in this process, a batch at a time: a few bytes per document, and on a small corpus a Ray Data
    round trip costs more than the read.
    """
    assignments = np.full(num_docs, -1, dtype=np.int64)
    inertia = 0.0
    shards = pads.dataset(str(shards_dir), format="parquet", partitioning="hive")
    for batch in shards.to_batches(columns=["doc_id", "sq_distance", "cluster"]):
        assignments[batch["doc_id"].to_numpy()] = batch["cluster"].to_numpy()
        inertia += float(pc.sum(batch["sq_distance"]).as_py() or 0.0)
    assert (assignments >= 0).all(), "every document is in exactly one shard"
    return assignments, inertia


def count_rows(parquet_dir: Path | str) -> int:
    return pads.dataset(str(parquet_dir), format="parquet").count_rows()  # from the footers, no data read


def cluster_stage(spec: JobSpec, paths: JobPaths, max_fit_documents: int = MAX_FIT_DOCUMENTS) -> dict:
    """Fit, assign, shard; saves OUTPUT/cluster/ exactly as `moedisco.cluster.ClusterResult.save` does."""
    _quiet_data_context()
    started = time.perf_counter()
    storage, tier = job_storage(spec), spec.resources.submodel_tier
    fit = ray.remote(fit_on_sample).options(num_cpus=1, label_selector=label_selector(spec, tier))
    result, covers_all = ray.get(fit.remote(spec, join(storage, "embeddings"), max_fit_documents))
    fitted = result.assignments if covers_all else None
    embeddings = ray.data.read_parquet(str(join(storage, "embeddings")))
    assigned = embeddings.map_batches(assign_batch, fn_kwargs={"result": result, "fitted": fitted},
                                      batch_format="numpy", label_selector=label_selector(spec, tier))
    assigned.write_parquet(_fresh(join(storage, "clusters")), partition_cols=["cluster"], **PARQUET_ARGS)
    fit_documents = count_rows(join(storage, "embeddings")) if covers_all else len(result.assignments)
    return _clustered(spec, paths, result, fit_documents, started)


def _clustered(spec: JobSpec, paths: JobPaths, result: cluster.ClusterResult, fit_documents: int,
               started: float) -> dict:
    """Read the assignments back from the per-cluster shards and save OUTPUT/cluster/ (both paths end here)."""
    storage = job_storage(spec)
    num_docs = count_rows(join(storage, "embeddings"))
    assignments, inertia = collect_assignments(join(storage, "clusters"), num_docs)
    full = cluster.ClusterResult(assignments, result.centroids, inertia, result.normalize, result.method)
    if min(full.sizes) == 0:
        raise ValueError("clustering left an expert with no documents; try cluster.method=balanced_kmeans")
    full.save(paths.clusters)
    # Submodels look up the held-out documents' clusters in a cache next to the clusters that the first of them
    # writes; written here, before any trainer starts, the concurrent submodels never race to write it.
    from moedisco.pipeline import eval_assignments

    eval_assignments(spec, paths)
    seconds = time.perf_counter() - started
    MetricsWriter(paths.metrics).write({"stage": "cluster", "step": 0, "sizes": full.sizes, "inertia": inertia,
                                        "seconds": seconds, "device": "cpu", "fit_documents": fit_documents})
    return {"sizes": full.sizes, "inertia": inertia, "method": full.method, "seconds": seconds, "device": "cpu",
            "fit_documents": fit_documents, "shards": str(join(storage, "clusters")), "num_nodes": 1}


# --- a corpus of one shard: every data stage in one process ----------------------------------------------------------


def embed_in_process(spec: JobSpec, paths: JobPaths, embedder) -> dict:
    """`embed_stage`'s outputs (corpus and embedding shards, metrics line) from `embedder` in this process."""
    from ray.data.extensions import ArrowTensorArray

    started = time.perf_counter()
    storage = job_storage(spec)
    num_docs = index_corpus(paths.texts("train"), join(storage, "corpus"))
    index_seconds = time.perf_counter() - started
    corpus = pads.dataset(str(join(storage, "corpus")), format="parquet").to_table().sort_by("doc_id")
    vectors_ND = embedder(corpus["text"].to_pylist())
    out = _fresh(join(storage, "embeddings"))
    pq.write_table(corpus.append_column("embedding", ArrowTensorArray.from_numpy(vectors_ND)),
                   join(out, "embeddings-0000000000.parquet"), **PARQUET_ARGS)
    return _embedded(spec, paths, num_docs, started, str(embedder.device.type), 1, index_seconds)


def cluster_in_process(spec: JobSpec, paths: JobPaths) -> dict:
    """`cluster_stage`'s outputs with the fit, the assignment and the shard writes in this process."""
    started = time.perf_counter()
    storage = job_storage(spec)
    table = pads.dataset(str(join(storage, "embeddings")), format="parquet").to_table().sort_by("doc_id")
    batch = {"doc_id": table["doc_id"].to_numpy(), "text": table["text"].to_pylist(),
             "embedding": np.concatenate([chunk.to_numpy() for chunk in table["embedding"].chunks])}
    result = cluster.fit_clusters(batch["embedding"], spec.cluster, spec.model.num_experts, spec.seed)
    assigned = assign_batch(batch, result, result.assignments)  # the fit saw every document, in doc_id order
    pq.write_to_dataset(pa.table(assigned), _fresh(join(storage, "clusters")), partition_cols=["cluster"],
                        **PARQUET_ARGS)
    return _clustered(spec, paths, result, len(batch["doc_id"]), started)
