"""Data decoupling: one cluster of documents per submodel, an expert or a group (paper sec. 3.1.2, eq. 4).

    result = fit_clusters(vectors_ND, spec.cluster, num_clusters=4, seed=0)
    result.assignments      # int64 [N], cluster of each document
    result.save(folder); ClusterResult.load(folder).assign(new_vectors)   # route new documents later
    result = declared_clusters(spec, paths)   # `field` (or one cluster): no embeddings, no fit
    summary = stage_cluster(run)      # the stage: fit on a bounded sample, assign all, cluster/tokens_<k>/ shards
    source = train_source(spec, paths, expert=2)   # what submodel 2 trains on, read by (seed, step) from its shard

`kmeans` is scikit-learn's k-means. `balanced_kmeans` bounds every cluster at (1 + slack) x N / K documents, as
c-BTM does, so no expert is starved or drowned. `random` is the paper's Fig. 6 ablation: equal-sized random shares.
`field` takes the domains a team already knows: the document field `cluster.field`, kept by the prepare stage,
puts each document, held-out ones too, in the cluster of its domain, cluster k holding `cluster.domains[k]` (by
default the training documents' distinct values, sorted); nothing is embedded. A job of one cluster (an extension
by one expert) embeds nothing either: every document is in cluster 0. Such declared clusters have no centroids
(`ClusterResult.centroids` is [K, 0]), so `assign` cannot route new documents by embedding.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moedisco.config.spec import ClusterConfig, JobSpec
from moedisco.io.atomic import write_atomically, writing
from moedisco.io.documents import DataError, chunks, iter_domains, iter_texts
from moedisco.job.layout import JobPaths
from moedisco.job.registry import needs_embeddings

if TYPE_CHECKING:
    import torch

    from moedisco.io.token_shards import SequenceSource, TokenShard
    from moedisco.stages.stage_run import StageRun

# torch, the token shards and the embedding model are imported in the functions that use them: the Ray runner's
# coordinating tasks fit and assign clusters with this module and need neither (half a GB and seconds per process).

# scikit-learn is imported where it is used: it takes about 2 s, and every training process and Ray task that only
# loads a `ClusterResult` (or reads cached assignments) would pay for it at start-up.


SINGLE = "single"  # the `method` of a one-cluster job's `ClusterResult`: nothing was fitted


@dataclass
class ClusterResult:
    assignments: np.ndarray
    centroids: np.ndarray  # [K, D]; [K, 0] for declared clusters (`field`, one cluster), which have none
    inertia: float
    normalize: bool
    method: str
    domains: list[str] | None = None  # `field`: cluster k holds the documents of domain k

    @property
    def sizes(self) -> list[int]:
        return np.bincount(self.assignments, minlength=len(self.centroids)).tolist()

    def assign(self, vectors_ND: np.ndarray) -> np.ndarray:
        """Nearest centroid for new documents (what a router of new data would do)."""
        if len(self.centroids) == 1:
            return np.zeros(len(vectors_ND), dtype=np.int64)
        if self.domains is not None:
            raise ValueError("these clusters are the domains of a document field (cluster.method 'field'): a "
                             "document's cluster is its domain's index in `domains`, not a nearest centroid")
        return _nearest(prepare_vectors(vectors_ND, self.normalize), self.centroids)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "assignments.npy", self.assignments)
        np.save(folder / "centroids.npy", self.centroids)
        summary = {"method": self.method, "normalize": self.normalize, "inertia": self.inertia, "sizes": self.sizes}
        if self.domains is not None:
            summary["domains"] = self.domains
        write_atomically(folder / "clusters.json", json.dumps(summary, indent=2))  # written last: the result is whole

    @classmethod
    def load(cls, folder: Path) -> ClusterResult:
        summary = json.loads((folder / "clusters.json").read_text())
        return cls(
            assignments=np.load(folder / "assignments.npy"),
            centroids=np.load(folder / "centroids.npy"),
            inertia=summary["inertia"],
            normalize=summary["normalize"],
            method=summary["method"],
            domains=summary.get("domains"),
        )


def prepare_vectors(vectors_ND: np.ndarray, normalize: bool) -> np.ndarray:
    """The geometry clustering works in: float64, L2-normalised when the spec says so."""
    from sklearn.preprocessing import normalize as l2_normalize

    vectors_ND = np.asarray(vectors_ND, dtype=np.float64)
    return l2_normalize(vectors_ND) if normalize else vectors_ND


def _sq_distances(vectors_ND: np.ndarray, centroids_KD: np.ndarray) -> np.ndarray:
    from sklearn.metrics.pairwise import euclidean_distances

    return euclidean_distances(vectors_ND, centroids_KD, squared=True)


def _nearest(vectors_ND: np.ndarray, centroids_KD: np.ndarray) -> np.ndarray:
    return _sq_distances(vectors_ND, centroids_KD).argmin(1).astype(np.int64)


def _inertia(vectors_ND: np.ndarray, centroids_KD: np.ndarray, assignments: np.ndarray) -> float:
    return float(((vectors_ND - centroids_KD[assignments]) ** 2).sum())


def _capacity_assign(distances_NK: np.ndarray, capacity: int) -> np.ndarray:
    """Greedy assignment under a size cap: documents with the most to lose from a second choice pick first."""
    num_docs, num_clusters = distances_NK.shape
    ranked = np.sort(distances_NK, axis=1)
    regret = ranked[:, 1] - ranked[:, 0] if num_clusters > 1 else np.zeros(num_docs)
    assignments = np.full(num_docs, -1, dtype=np.int64)
    load = np.zeros(num_clusters, dtype=np.int64)
    for doc in np.argsort(-regret, kind="stable"):
        for cluster in np.argsort(distances_NK[doc], kind="stable"):
            if load[cluster] < capacity:
                assignments[doc], load[cluster] = cluster, load[cluster] + 1
                break
    return assignments


def balanced_kmeans(vectors_ND: np.ndarray, num_clusters: int, slack: float, seed: int, n_init: int,
                    max_iter: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """k-means initialised by scikit-learn, then Lloyd iterations whose assignment step respects the size cap."""
    from sklearn.cluster import KMeans

    capacity = int(np.ceil((1.0 + slack) * len(vectors_ND) / num_clusters))
    centroids = KMeans(num_clusters, n_init=n_init, random_state=seed).fit(vectors_ND).cluster_centers_
    assignments = np.full(len(vectors_ND), -1)
    for _ in range(max_iter):
        new = _capacity_assign(_sq_distances(vectors_ND, centroids), capacity)
        if np.array_equal(new, assignments):
            break
        assignments = new
        centroids = np.stack([vectors_ND[assignments == k].mean(0) for k in range(num_clusters)])
    return assignments, centroids


def _random_split(vectors_ND: np.ndarray, num_clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    permutation = np.random.default_rng(seed).permutation(len(vectors_ND))
    assignments = np.empty(len(vectors_ND), dtype=np.int64)
    assignments[permutation] = np.arange(len(vectors_ND)) % num_clusters
    centroids = np.stack([vectors_ND[assignments == k].mean(0) for k in range(num_clusters)])
    return assignments, centroids


def fit_clusters(vectors_ND: np.ndarray, cfg: ClusterConfig, num_clusters: int, seed: int) -> ClusterResult:
    if len(vectors_ND) < num_clusters:
        raise ValueError(f"{len(vectors_ND)} documents cannot fill {num_clusters} clusters (one per submodel: "
                         "model.num_experts / model.experts_per_submodel)")
    vectors_ND = prepare_vectors(vectors_ND, cfg.normalize)
    if cfg.method == "kmeans":
        from sklearn.cluster import KMeans

        km = KMeans(num_clusters, n_init=cfg.n_init, random_state=seed).fit(vectors_ND)
        assignments, centroids = km.labels_.astype(np.int64), km.cluster_centers_
    elif cfg.method == "balanced_kmeans":
        assignments, centroids = balanced_kmeans(vectors_ND, num_clusters, cfg.balance_slack, seed, cfg.n_init)
    else:
        assignments, centroids = _random_split(vectors_ND, num_clusters, seed)
    if np.bincount(assignments, minlength=num_clusters).min() == 0:
        raise ValueError("clustering left an expert with no documents; try cluster.method=balanced_kmeans")
    inertia = _inertia(vectors_ND, centroids, assignments)
    return ClusterResult(assignments, centroids.astype(np.float64), inertia, cfg.normalize, cfg.method)


MAX_FIT_DOCUMENTS = 100_000  # 100k x 384 float64 = 300 MB in the fitting process
ASSIGN_CHUNK = 65_536


def fit_sample(num_docs: int, max_fit_documents: int, seed: int) -> np.ndarray | None:
    """The documents k-means is fitted on, ascending: None (all of them) when there are at most
    `max_fit_documents`, else a seeded uniform sample of that many. Both runners fit on this sample, so a corpus
    gets the same clusters from either."""
    if num_docs <= max_fit_documents:
        return None
    return np.sort(np.random.default_rng(seed).choice(num_docs, max_fit_documents, replace=False))


def fit_streaming(vectors_ND: np.ndarray, cfg: ClusterConfig, num_clusters: int, seed: int,
                  max_fit_documents: int = MAX_FIT_DOCUMENTS) -> ClusterResult:
    """`fit_clusters` for embeddings of any number of documents (a memory map): fitted on all of them when they
    are at most `max_fit_documents`, else on a seeded uniform sample of that many, every document then going to
    its nearest centroid a chunk at a time. A sample this size puts the centroids within a few percent of a full
    fit's objective and keeps the paper's algorithm (k-means++ with `n_init` restarts)."""
    num_docs = len(vectors_ND)
    sample = fit_sample(num_docs, max_fit_documents, seed)
    if sample is None:
        return fit_clusters(np.asarray(vectors_ND), cfg, num_clusters, seed)
    fitted = fit_clusters(np.asarray(vectors_ND[sample]), cfg, num_clusters, seed)
    assignments, inertia = np.empty(num_docs, dtype=np.int64), 0.0
    for start in range(0, num_docs, ASSIGN_CHUNK):
        chunk_ND = prepare_vectors(vectors_ND[start : start + ASSIGN_CHUNK], cfg.normalize)
        labels = _nearest(chunk_ND, fitted.centroids)
        assignments[start : start + len(labels)] = labels
        inertia += _inertia(chunk_ND, fitted.centroids, labels)
    return ClusterResult(assignments, fitted.centroids, inertia, cfg.normalize, cfg.method)


def _experts_field(spec: JobSpec) -> str:
    if spec.method == "extend":
        return "extend.new_experts"
    return "model.num_experts" if spec.model.experts_per_submodel == 1 else "model.num_experts / experts_per_submodel"


def field_domains(spec: JobSpec, train_domains: list[str]) -> list[str]:
    """The domain of each cluster: `cluster.domains`, else the training documents' distinct values, sorted; one per
    cluster, each with training documents."""
    cfg, found = spec.cluster, sorted(set(train_domains))
    experts = f"{_experts_field(spec)} is {spec.num_clusters}: one submodel per domain"
    if cfg.domains is None and len(found) != spec.num_clusters:
        raise DataError(f"the training documents' {cfg.field} has {len(found)} values ({', '.join(found)}), but "
                        f"{experts} (cluster.domains with data.on_error 'skip' keeps only some)")
    if cfg.domains is not None and len(cfg.domains) != spec.num_clusters:
        raise DataError(f"cluster.domains names {len(cfg.domains)} domains ({', '.join(cfg.domains)}), but {experts}")
    if missing := sorted(set(cfg.domains or ()) - set(found)):
        raise DataError(f"no training document has {cfg.field} {', '.join(missing)} (cluster.domains): every expert "
                        f"needs documents; the training documents have {', '.join(found)}")
    return list(cfg.domains or found)


def domain_assignments(values: list[str], domains: list[str], where: Path) -> np.ndarray:
    """The cluster of each document of the split `where`, whose domains are `values`: its domain's index."""
    index = {domain: k for k, domain in enumerate(domains)}
    if unknown := sorted(set(values) - set(index)):
        raise DataError(f"{where}: documents of domain {', '.join(unknown)}, which no expert has (the experts' "
                        f"domains: {', '.join(domains)})")
    return np.fromiter((index[value] for value in values), dtype=np.int64, count=len(values))


def declared_clusters(spec: JobSpec, paths: JobPaths) -> ClusterResult:
    """The clusters of a job that embeds nothing (`moedisco.job.registry.needs_embeddings`): with `field`, each
    training document in its domain's cluster; else (one cluster) every document in cluster 0."""
    if spec.cluster.method != "field":
        num_docs = json.loads(paths.split_summary.read_text())["train_documents"]
        return ClusterResult(np.zeros(num_docs, dtype=np.int64), np.zeros((1, 0)), 0.0, spec.cluster.normalize,
                             SINGLE)
    values = list(iter_domains(paths.texts("train")))
    domains = field_domains(spec, values)
    assignments = domain_assignments(values, domains, paths.texts("train"))
    return ClusterResult(assignments, np.zeros((len(domains), 0)), 0.0, spec.cluster.normalize, "field", domains)


def _clusters(spec: JobSpec, paths: JobPaths) -> tuple[ClusterResult, bool]:
    """The job's clusters: those already saved for this corpus, else a fit now (which voids the old shards);
    declared ones (`declared_clusters`) are read again, their shards kept when they are the same."""
    if not needs_embeddings(spec):
        result = declared_clusters(spec, paths)
        save_clusters(spec, paths, result)
        return result, False
    from moedisco.io.token_shards import RowFile

    vectors_ND = RowFile(paths.embeddings)  # one pass, through the file: no 1.5 GB of mapped pages at 1M
    if (paths.clusters / "clusters.json").is_file():
        saved = ClusterResult.load(paths.clusters)
        if len(saved.assignments) == len(vectors_ND) and len(saved.centroids) == spec.num_clusters:
            return saved, False
    result = fit_streaming(vectors_ND, spec.cluster, spec.num_clusters, spec.seed)
    save_clusters(spec, paths, result)
    return result, True



def save_clusters(spec: JobSpec, paths: JobPaths, result: ClusterResult) -> None:
    """Save the job's clusters (both runners). The per-cluster token shards and the held-out documents' clusters
    cached for other clusters go first: both are reused for as long as they exist (`cluster_shard`,
    `moedisco.stages.cluster.eval_assignments`)."""
    try:
        old = ClusterResult.load(paths.clusters)
    except (OSError, ValueError, KeyError, EOFError):  # no clusters saved yet, or a save cut short
        old = None
    same = old is not None and np.array_equal(old.assignments, result.assignments) and np.array_equal(
        old.centroids, result.centroids) and old.domains == result.domains
    if not same:
        for expert in range(spec.num_clusters):
            shutil.rmtree(paths.cluster_tokens(expert), ignore_errors=True)
        (paths.clusters / "eval_assignments.npy").unlink(missing_ok=True)
    result.save(paths.clusters)



def write_cluster_tokens(paths: JobPaths, assignments: np.ndarray, expert: int) -> TokenShard:
    """Cluster `expert`'s documents, in corpus order, copied from the train shard into cluster/tokens_<expert>/."""
    return copy_documents(paths.tokens("train"), np.flatnonzero(assignments == expert), paths.cluster_tokens(expert))


def copy_documents(shard: Path, doc_ids: np.ndarray, out: Path) -> TokenShard:
    """Documents `doc_ids` of the token shard in `shard`, in order, copied into a shard of their own at `out`."""
    from moedisco.io.token_shards import TokenShard, TokenShardWriter

    with TokenShardWriter(out) as writer:
        for tokens, lengths in TokenShard.load(shard).select(doc_ids):
            writer.add_flat(tokens, lengths)
    return TokenShard.load(out)



def stage_cluster(run: StageRun) -> dict:
    spec, paths = run.spec, run.paths
    started = time.perf_counter()
    result, fitted = _clusters(spec, paths)
    from moedisco.io.token_shards import is_complete

    written = [k for k in range(spec.num_clusters) if not is_complete(paths.cluster_tokens(k))]
    for expert in written:
        write_cluster_tokens(paths, result.assignments, expert)
    if not needs_embeddings(spec):
        eval_assignments(spec, paths)  # no embedding to pay for: a held-out domain no expert has fails here
    seconds = time.perf_counter() - started
    run.metrics.write({"stage": "cluster", "step": 0, "sizes": result.sizes, "inertia": result.inertia,
                       "seconds": seconds, "device": "cpu"})
    declared = {} if result.domains is None else {"domains": result.domains}
    return {"sizes": result.sizes, "inertia": result.inertia, "method": result.method, **declared,
            "fitted": fitted, "shards_written": written, "seconds": seconds}



def cluster_shard(paths: JobPaths, expert: int) -> TokenShard:
    """Cluster `expert`'s token shard, made from the saved assignments if the cluster stage did not (the Ray
    runner's cluster stage saves only the assignments)."""
    from moedisco.io.token_shards import TokenShard, is_complete

    if not is_complete(paths.cluster_tokens(expert)):
        # Written under a name of its own and renamed: each submodel trainer makes only its own cluster's shard.
        write_cluster_tokens(paths, ClusterResult.load(paths.clusters).assignments, expert)
    return TokenShard.load(paths.cluster_tokens(expert))



def train_source(spec: JobSpec, paths: JobPaths, expert: int | None = None) -> SequenceSource:
    """The training sequences of cluster `expert` (None: the whole train split), read from their shard."""
    from moedisco.io.token_shards import SequenceSource, TokenShard

    shard = TokenShard.load(paths.tokens("train")) if expert is None else cluster_shard(paths, expert)
    return SequenceSource(shard, spec.data.sequence_length)


def eval_assignments(spec: JobSpec, paths: JobPaths, cache: bool = True) -> np.ndarray:
    """Cluster of every held-out document: its domain's (`field`), 0 (one cluster), else its nearest centroid's
    (computed once, cached next to the clusters; `cache` False: never written, as for another job's folder,
    which may be read-only or another runner's)."""
    cached = paths.clusters / "eval_assignments.npy"
    if not cached.is_file() and not cache:
        return _held_out_clusters(spec, paths, ClusterResult.load(paths.clusters))
    if not cached.is_file():
        assigned = _held_out_clusters(spec, paths, ClusterResult.load(paths.clusters))
        # Written aside and renamed: concurrent submodel trainers may fill the cache at the same time.
        with writing(cached) as partial, partial.open("wb") as handle:
            np.save(handle, assigned)
    return np.load(cached)


def _held_out_clusters(spec: JobSpec, paths: JobPaths, clusters: ClusterResult) -> np.ndarray:
    held_out = paths.texts("eval")
    if clusters.domains is not None:
        return domain_assignments(list(iter_domains(held_out)), clusters.domains, held_out)
    if len(clusters.centroids) == 1:
        return np.zeros(json.loads(paths.split_summary.read_text())["eval_documents"], dtype=np.int64)
    from moedisco.stages.embed import Embedder

    embedder = Embedder(spec.embed)
    # A chunk at a time: a large corpus's held-out share is more text than one process should hold.
    assigned = [clusters.assign(embedder(texts)) for texts in chunks(iter_texts(held_out))]
    return np.concatenate(assigned) if assigned else np.zeros(0, dtype=np.int64)



def cluster_eval_sequence(spec: JobSpec, paths: JobPaths, expert: int, cache: bool = True,
                          assignments: np.ndarray | None = None) -> torch.Tensor:
    """Held-out sequences of cluster `expert` (empty when the cluster has too few held-out tokens); `assignments`:
    `eval_assignments` when the caller has them already."""
    import torch

    from moedisco.stages.prepare import load_corpus

    assigned = eval_assignments(spec, paths, cache) if assignments is None else assignments
    doc_ids = np.flatnonzero(assigned == expert)
    try:
        return load_corpus(paths, "eval").pack(spec.data.sequence_length, doc_ids)
    except DataError:
        return torch.zeros(0, spec.data.sequence_length, dtype=torch.long)



def cluster_eval_sequences(spec: JobSpec, paths: JobPaths, cache: bool = True) -> list[torch.Tensor]:
    assignments = eval_assignments(spec, paths, cache)  # once: uncached, they may mean embedding the split
    return [cluster_eval_sequence(spec, paths, k, assignments=assignments) for k in range(spec.num_clusters)]
