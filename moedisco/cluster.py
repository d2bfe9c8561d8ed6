"""Data decoupling: partition documents into one cluster per expert (paper sec. 3.1.2, eq. 4).

    result = fit_clusters(vectors_ND, spec.cluster, num_clusters=4, seed=0)
    result.assignments      # int64 [N], cluster of each document
    result.save(folder); ClusterResult.load(folder).assign(new_vectors)   # route new documents later

`kmeans` is scikit-learn's k-means. `balanced_kmeans` bounds every cluster at (1 + slack) x N / K documents, as
c-BTM does, so no expert is starved or drowned. `random` is the paper's Fig. 6 ablation: equal-sized random shares.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moedisco.config import ClusterConfig
from moedisco.layout import write_atomically

# scikit-learn is imported where it is used: it takes about 2 s, and every training process and Ray task that only
# loads a `ClusterResult` (or reads cached assignments) would pay for it at start-up.


@dataclass
class ClusterResult:
    assignments: np.ndarray
    centroids: np.ndarray
    inertia: float
    normalize: bool
    method: str

    @property
    def sizes(self) -> list[int]:
        return np.bincount(self.assignments, minlength=len(self.centroids)).tolist()

    def assign(self, vectors_ND: np.ndarray) -> np.ndarray:
        """Nearest centroid for new documents (what a router of new data would do)."""
        return _nearest(prepare_vectors(vectors_ND, self.normalize), self.centroids)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "assignments.npy", self.assignments)
        np.save(folder / "centroids.npy", self.centroids)
        summary = {"method": self.method, "normalize": self.normalize, "inertia": self.inertia, "sizes": self.sizes}
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
        raise ValueError(f"{len(vectors_ND)} documents cannot fill {num_clusters} clusters (model.num_experts)")
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
