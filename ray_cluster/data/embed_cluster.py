"""The embed and cluster stages on Ray: on Ray Data over the cheap tier, or both in one process for a corpus of one
shard.

    embed_stage(spec, paths, max_nodes=2)     # the fit's documents -> STORAGE/<job>/embeddings/
    cluster_stage(spec, paths, max_nodes=2)   # fit, then every other document -> OUTPUT/cluster/
    embed_in_process(spec, paths)                   # the same files in this process (the job's data worker)
    cluster_in_process(spec, paths)

`embed_stage` indexes the train split (`ray_cluster.data.shards`) and embeds the documents k-means is fitted on,
every one up to `max_fit_documents`, else the local runner's seeded sample (`moedisco.stages.cluster.fit_sample`),
with a pool of `EmbedBatches` actors that each load the embedding model once and read their own shards.
`cluster_stage` fits `moedisco.stages.cluster.fit_clusters` on them in one Ray task, in corpus order (the paper's
k-means++ with `n_init` restarts). When the fit saw every document its labels are the clusters; else every other
document goes through the embedding pool once and leaves its actor as its nearest centroid and distance, saved as
the rows arrive (`AssignedParts`) so that an interrupted pass resumes. So every document is embedded once, no process
holds the corpus text or more embeddings than the fit sample's, and the clusters are the local runner's
(`moedisco.stages.cluster.fit_streaming`), document for document. The in-process variants write the same shards and
OUTPUT files, their fit seeing every document, so both paths give the same clusters. The fit's task and the pool's
actors say which node they hold through `reporter` (`node_uses.NodeUseReporter`); the actors only as they start,
the driver closing their uses when the stage's result arrives. A job that embeds nothing (`cluster.method: field`,
or one cluster: `moedisco.job.registry.needs_embeddings`) has no embed stage, and its cluster stage, either way, is
`moedisco.stages.cluster.declared_clusters` in the stage's own process: one read of the split's domains.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data

from moedisco.config.resources import TierConfig
from moedisco.config.spec import EmbedConfig, JobSpec
from moedisco.io.storage import join, remove_tree
from moedisco.job.metrics import MetricsWriter
from moedisco.job.registry import needs_embeddings
from moedisco.stages import cluster
from ray_cluster.data.shards import (
    PARQUET_ARGS,
    fresh,
    fs_path,
    index_corpus,
    indexed,
    parallel_tokenizer,
    quiet_data_context,
    read_shard,
    shard_ranges,
    through_actors,
)
from ray_cluster.node_uses import SILENT, NodeUseReporter
from ray_cluster.placement import (
    job_storage,
    label_selector,
    prepare_worker,
    task_options,
    tier_simulated,
)

if TYPE_CHECKING:
    from moedisco.job.layout import JobPaths

MAX_FIT_DOCUMENTS = cluster.MAX_FIT_DOCUMENTS  # one bound for both runners


# --- 1. embed: the fit's documents through a pool of embedding actors -------------------------------------------------


class EmbedBatches:
    """Ray Data actor UDF over shard locations (`ray_cluster.data.shards.shard_dataset`): reads each shard's rows that
    `keep_ref`'s flags keep and embeds them; given `clusters`, each document leaves as its nearest centroid and
    squared distance instead of its vector. The embedding model is loaded once per actor, in `__init__`."""

    def __init__(self, cfg: EmbedConfig, tier: TierConfig, keep_ref: ray.ObjectRef,
                 clusters: cluster.ClusterResult | None = None, reporter: NodeUseReporter = SILENT):
        reporter.open()  # closed by the driver with the stage: Ray Data ends the pool's actors without a word
        from moedisco.stages.embed import Embedder  # transformers: only the embedding actors need it

        prepare_worker(tier)
        parallel_tokenizer()
        # The flags by reference, read once from the node's object store: 1 MB at 1M documents.
        self.embedder, self.keep_N, self.clusters = Embedder(cfg), ray.get(keep_ref), clusters
        # Ray has every worker run a full `gc.collect` whenever its object store fills; over the ~500k objects
        # that torch and transformers leave, each took the GIL from the embedding for 0.3 s or more. Frozen, they
        # are never scanned again; they live as long as the actor anyway.
        gc.freeze()

    def __call__(self, batch: dict) -> dict:
        # The embedder runs its encoder in batches of `embed.batch_size` itself.
        table = pa.concat_tables([read_shard(location, self.keep_N) for location in batch["shard"]])
        doc_ids_B, vectors_BD = table["doc_id"].to_numpy(), self.embedder(table["text"].to_pylist())
        if self.clusters is None:
            return {"doc_id": doc_ids_B, "embedding": vectors_BD}
        return assign_batch(doc_ids_B, vectors_BD, self.clusters)


def assign_batch(doc_ids_B: np.ndarray, vectors_BD: np.ndarray, result: cluster.ClusterResult) -> dict:
    """Each document's nearest centroid and its squared distance, in the geometry the fit used."""
    assignments_B = result.assign(vectors_BD)
    prepared_BD = cluster.prepare_vectors(vectors_BD, result.normalize)
    sq_distance_B = ((prepared_BD - result.centroids[assignments_B]) ** 2).sum(1)
    return {"doc_id": doc_ids_B, "cluster": assignments_B, "sq_distance": sq_distance_B}


def _flags(num_docs: int, *doc_ids: np.ndarray) -> np.ndarray:
    flags_N = np.zeros(num_docs, dtype=bool)
    for ids in doc_ids:
        flags_N[ids] = True
    return flags_N


def _through_pool(spec: JobSpec, corpus: Path | str, keep_N: np.ndarray, max_nodes: int,
                  clusters: cluster.ClusterResult | None = None,
                  reporter: NodeUseReporter = SILENT) -> tuple[ray.data.Dataset, int]:
    """The corpus's documents that `keep_N` flags through the embedding actors (`shards.through_actors`). About a
    shard's worth of kept documents per call, as the in-process stage embeds a chunk per call: a pass that
    keeps a tenth of each shard (the fit's sample at 1M) reads ten shards a call, not one."""
    tier = spec.resources.submodel_tier
    shards = shard_ranges(corpus, len(keep_N), keep_N)
    rows = sum(shard["stop"] - shard["first"] for shard in shards)
    kwargs = {"cfg": spec.embed, "tier": tier, "keep_ref": ray.put(keep_N), "clusters": clusters,
              "reporter": reporter}
    return through_actors(shards, EmbedBatches, kwargs, max_nodes, task_options(spec, tier),
                          shards_per_call=round(rows / max(1, int(keep_N.sum()))))


def _embedded(spec: JobSpec, paths: JobPaths, summary: dict, started: float) -> dict:
    summary = {**summary, "seconds": time.perf_counter() - started}
    MetricsWriter(paths.metrics).write({"stage": "embed", "step": summary["documents"], **summary})
    return summary


def _device(spec: JobSpec) -> str:
    tier = spec.resources.submodel_tier
    return "cuda" if task_options(spec, tier)["num_gpus"] > 0 and not tier_simulated(spec, tier) else "cpu"


def embed_stage(spec: JobSpec, paths: JobPaths, max_nodes: int, max_fit_documents: int = MAX_FIT_DOCUMENTS,
                reporter: NodeUseReporter = SILENT) -> dict:
    """Index the train split, and embed the documents k-means will be fitted on (every one, up to
    `max_fit_documents`; else the local runner's sample, `moedisco.stages.cluster.fit_sample`) into
    STORAGE/<job>/embeddings/. The rest are embedded by `cluster_stage`, once, on their way to a cluster."""
    quiet_data_context()
    started = time.perf_counter()
    storage = job_storage(spec)
    num_docs = index_corpus(paths.texts("train"), join(storage, "corpus"), spec.data.rows_per_shard)
    index_seconds = time.perf_counter() - started
    remove_tree(join(storage, "assigned"))  # rows of an earlier fit: the fit to come is on these embeddings
    sample = cluster.fit_sample(num_docs, max_fit_documents, spec.seed)
    if sample is not None and spec.cluster.method == "random":
        raise ValueError(f"cluster.method=random needs every document in one fit; the corpus has {num_docs} "
                         f"documents, more than the {max_fit_documents} the Ray runner fits at once")
    keep_N = np.ones(num_docs, dtype=bool) if sample is None else _flags(num_docs, sample)
    num_embedded = int(keep_N.sum())
    embedded, num_actors = _through_pool(spec, join(storage, "corpus"), keep_N, max_nodes, reporter=reporter)
    embedded.write_parquet(fresh(join(storage, "embeddings")), **PARQUET_ARGS)
    return _embedded(spec, paths, {"documents": num_embedded, "corpus_documents": num_docs,
                                   "index_seconds": index_seconds, "device": _device(spec), "num_nodes": num_actors},
                     started)


# --- 2. cluster: k-means on the embedded documents --------------------------------------------------------------------


def read_embeddings(embeddings_dir: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """(doc_ids, vectors_ND) of the embedded documents, in corpus order (the order the local runner fits them in).

    At most `max_fit_documents` of them: read with pyarrow in this process, where a Ray Data round trip would cost
    more than the read."""
    table = pads.dataset(str(embeddings_dir), format="parquet").to_table().sort_by("doc_id")
    vectors_ND = np.concatenate([chunk.to_numpy() for chunk in table["embedding"].chunks])
    return table["doc_id"].to_numpy(), vectors_ND


def fit_on_embeddings(spec: JobSpec, embeddings_dir: Path | str,
                      reporter: NodeUseReporter = SILENT) -> tuple[cluster.ClusterResult, dict]:
    """The spec's clustering fitted on the embedded documents, and each of them by nearest centroid (what a
    sampled fit gives the documents it saw, as in `moedisco.stages.cluster.fit_streaming`)."""
    with reporter.held():
        doc_ids, vectors_ND = read_embeddings(embeddings_dir)
        result = cluster.fit_clusters(vectors_ND, spec.cluster, spec.num_clusters, spec.seed)
        return result, assign_batch(doc_ids, vectors_ND, result)


# --- 3. cluster: every other document, embedded and assigned in one pass ----------------------------------------------


class AssignedParts:
    """The assignment pass's rows as they arrive, one small Parquet file per batch under STORAGE/<job>/assigned/,
    so an interrupted pass resumes where it stopped. A file is written under a `_partial` name and renamed, and
    carries a digest of the fit and the corpus's index in its name: files of another fit or corpus are deleted
    (and the embed stage deletes them all whenever it embeds the fit's documents again)."""

    COLUMNS = ("doc_id", "cluster", "sq_distance")

    def __init__(self, folder: Path | str, result: cluster.ClusterResult, num_docs: int, corpus: dict | None):
        # The fit and the corpus it assigns (the index's stamp: documents edited at the same count change it too).
        digest = hashlib.blake2b(np.ascontiguousarray(result.centroids).tobytes(), digest_size=8)
        digest.update(json.dumps([result.normalize, num_docs, corpus], sort_keys=True).encode())
        self.prefix = f"fit-{digest.hexdigest()}-"
        self.fs, self.root = fs_path(folder)
        self.fs.create_dir(self.root, recursive=True)
        listed = self.fs.get_file_info(pafs.FileSelector(self.root))
        self.files = [f.path for f in listed if f.is_file and f.base_name.startswith(self.prefix)]
        for stale in (f.path for f in listed if f.is_file and f.path not in self.files):
            self.fs.delete_file(stale)

    def read(self) -> dict[str, np.ndarray]:
        if not self.files:
            return {"doc_id": np.zeros(0, np.int64), "cluster": np.zeros(0, np.int64), "sq_distance": np.zeros(0)}
        table = pads.dataset(self.files, filesystem=self.fs, format="parquet").to_table(columns=list(self.COLUMNS))
        return {name: table[name].to_numpy() for name in self.COLUMNS}

    def write(self, batch: dict) -> None:
        name = f"{self.prefix}{int(batch['doc_id'].min()):010d}-{uuid.uuid4().hex[:8]}.parquet"
        partial = f"{self.root}/_partial-{name}"
        pq.write_table(pa.table({k: batch[k] for k in self.COLUMNS}), partial, filesystem=self.fs, **PARQUET_ARGS)
        self.fs.move(partial, f"{self.root}/{name}")


def assign_rest(spec: JobSpec, result: cluster.ClusterResult, fitted: dict, num_docs: int, max_nodes: int,
                reporter: NodeUseReporter = SILENT) -> tuple[np.ndarray, float, dict]:
    """Every document the fit did not see, through the embedding pool once, leaving the actors as its cluster and
    distance (a few bytes: no embedding is written or kept), saved as it comes (`AssignedParts`); documents an
    interrupted run of this pass saved are not embedded again. Returns (assignments, inertia, pass summary)."""
    storage = job_storage(spec)
    parts = AssignedParts(join(storage, "assigned"), result, num_docs, indexed(join(storage, "corpus"))["stamp"])
    resumed = parts.read()
    assignments = np.full(num_docs, -1, dtype=np.int64)
    for known in (fitted, resumed):
        assignments[known["doc_id"]] = known["cluster"]
    inertia = float(fitted["sq_distance"].sum() + resumed["sq_distance"].sum())
    skip_N = _flags(num_docs, fitted["doc_id"], resumed["doc_id"])
    num_actors = 0
    if not skip_N.all():
        clusters = cluster.ClusterResult(np.zeros(0, np.int64), result.centroids, result.inertia, result.normalize,
                                         result.method)  # the geometry only: the actors need no sample labels
        assigned, num_actors = _through_pool(spec, join(storage, "corpus"), ~skip_N, max_nodes, clusters,
                                             reporter)
        for batch in assigned.iter_batches(batch_size=None, batch_format="numpy"):
            parts.write(batch)
            assignments[batch["doc_id"]] = batch["cluster"]
            inertia += float(batch["sq_distance"].sum())
    assert (assignments >= 0).all(), "every document is assigned once"
    return assignments, inertia, {"num_nodes": max(1, num_actors), "resumed_documents": len(resumed["doc_id"])}


def cluster_stage(spec: JobSpec, paths: JobPaths, max_nodes: int,
                  reporter: NodeUseReporter = SILENT) -> dict:
    """Fit k-means on the embedded documents, and assign the corpus: by the fit itself when it saw every
    document, else the rest through `assign_rest`. Saves OUTPUT/cluster/ as `ClusterResult.save` does."""
    if not needs_embeddings(spec):
        return declare_clusters(spec, paths)
    quiet_data_context()
    started = time.perf_counter()
    storage, tier = job_storage(spec), spec.resources.submodel_tier
    fit = ray.remote(fit_on_embeddings).options(num_cpus=1, label_selector=label_selector(spec, tier))
    result, fitted = ray.get(fit.remote(spec, join(storage, "embeddings"), reporter))
    fit_seconds = time.perf_counter() - started
    num_docs, fit_documents = indexed(join(storage, "corpus"))["documents"], len(fitted["doc_id"])
    if fit_documents == num_docs:
        return _clustered(spec, paths, result, result.assignments, result.inertia, started,
                          {"fit_documents": fit_documents, "fit_seconds": fit_seconds, "device": "cpu",
                           "num_nodes": 1})
    assignments, inertia, passed = assign_rest(spec, result, fitted, num_docs, max_nodes, reporter)
    return _clustered(spec, paths, result, assignments, inertia, started,
                      {"fit_documents": fit_documents, "fit_seconds": fit_seconds, "device": _device(spec), **passed,
                       "assign_seconds": time.perf_counter() - started - fit_seconds})


def _clustered(spec: JobSpec, paths: JobPaths, result: cluster.ClusterResult, assignments: np.ndarray,
               inertia: float, started: float, extra: dict) -> dict:
    """Save OUTPUT/cluster/ and the held-out documents' clusters (both paths end here)."""
    full = cluster.ClusterResult(assignments, result.centroids, inertia, result.normalize, result.method,
                                 result.domains)
    if min(full.sizes) == 0:
        raise ValueError("clustering left an expert with no documents; try cluster.method=balanced_kmeans")
    from moedisco.stages.cluster import eval_assignments, save_clusters

    save_clusters(spec, paths, full)
    # Submodels look up the held-out documents' clusters in a cache next to the clusters that the first of them
    # writes; written here, before any trainer starts, the concurrent submodels never race to write it.
    eval_assignments(spec, paths)
    declared = {} if full.domains is None else {"domains": full.domains}
    summary = {"sizes": full.sizes, "inertia": inertia, "method": full.method, **declared, **extra,
               "seconds": time.perf_counter() - started}
    MetricsWriter(paths.metrics).write({"stage": "cluster", "step": 0, **summary})
    return summary


# --- 4. a corpus of one shard: both stages in one process (the job's data worker) -------------------------------------


def embed_in_process(spec: JobSpec, paths: JobPaths, embedder=None) -> dict:
    """`embed_stage`'s outputs (corpus and embedding shards, metrics line) in this process, from `embedder` or, by
    default, the spec's embedding model loaded here (on the node's CPUs for the tokenizer)."""
    from ray.data.extensions import ArrowTensorArray

    if embedder is None:
        from moedisco.stages.embed import Embedder

        parallel_tokenizer()
        embedder = Embedder(spec.embed)
    started = time.perf_counter()
    storage = job_storage(spec)
    num_docs = index_corpus(paths.texts("train"), join(storage, "corpus"), spec.data.rows_per_shard)
    index_seconds = time.perf_counter() - started
    corpus = pads.dataset(str(join(storage, "corpus")), format="parquet").to_table().sort_by("doc_id")
    vectors_ND = embedder(corpus["text"].to_pylist())
    out = fresh(join(storage, "embeddings"))
    table = pa.table({"doc_id": corpus["doc_id"], "embedding": ArrowTensorArray.from_numpy(vectors_ND)})
    pq.write_table(table, join(out, "embeddings-0000000000.parquet"), **PARQUET_ARGS)
    return _embedded(spec, paths, {"documents": num_docs, "corpus_documents": num_docs, "index_seconds": index_seconds,
                                   "device": str(embedder.device.type), "num_nodes": 1}, started)


def cluster_in_process(spec: JobSpec, paths: JobPaths) -> dict:
    """`cluster_stage`'s outputs with the fit in this process (it sees every document of a one-shard corpus)."""
    if not needs_embeddings(spec):
        return declare_clusters(spec, paths)
    started = time.perf_counter()
    result, fitted = fit_on_embeddings(spec, join(job_storage(spec), "embeddings"))
    return _clustered(spec, paths, result, result.assignments, result.inertia, started,
                      {"fit_documents": len(fitted["doc_id"]), "device": "cpu", "num_nodes": 1})


def declare_clusters(spec: JobSpec, paths: JobPaths) -> dict:
    """The clusters of a job that embeds nothing (`moedisco.stages.cluster.declared_clusters`), in this process
    (on Ray Data too: the work is one read of the split's domains), saved as a fit's are."""
    started = time.perf_counter()
    result = cluster.declared_clusters(spec, paths)
    return _clustered(spec, paths, result, result.assignments, result.inertia, started,
                      {"fit_documents": 0, "device": "cpu", "num_nodes": 1})
