"""Data decoupling on the bundled corpus: clusters recover its domains far better than chance."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from moedisco.config.spec import ClusterConfig, EmbedConfig
from moedisco.stages.cluster import ClusterResult, fit_clusters
from moedisco.stages.embed import Embedder
from tests.conftest import CORPUS


def purity(labels, assignments) -> float:
    total = 0
    for cluster in np.unique(assignments):
        _, counts = np.unique(np.asarray(labels)[assignments == cluster], return_counts=True)
        total += counts.max()
    return total / len(labels)


@pytest.fixture(scope="module")
def embedded_sample():
    rows = [json.loads(line) for line in CORPUS.read_text().splitlines()[:600]]
    vectors = Embedder(EmbedConfig(batch_size=64, max_length=128))([r["text"] for r in rows])
    return vectors, [r["domain"] for r in rows]


@pytest.mark.parametrize("method", ["kmeans", "balanced_kmeans"])
def test_clusters_recover_domains(embedded_sample, method, tmp_path):
    vectors, domains = embedded_sample
    result = fit_clusters(vectors, ClusterConfig(method=method), num_clusters=4, seed=0)
    chance = fit_clusters(vectors, ClusterConfig(method="random"), num_clusters=4, seed=0)
    nmi = normalized_mutual_info_score(domains, result.assignments)
    print(f"{method}: NMI {nmi:.3f}, purity {purity(domains, result.assignments):.3f}, sizes {result.sizes}")
    assert nmi > 0.5 and purity(domains, result.assignments) > 0.7
    assert normalized_mutual_info_score(domains, chance.assignments) < 0.05
    result.save(tmp_path)
    again = ClusterResult.load(tmp_path)
    assert np.array_equal(again.assign(vectors), result.assign(vectors))


def test_balanced_respects_the_size_bound(embedded_sample):
    vectors, _ = embedded_sample
    result = fit_clusters(vectors, ClusterConfig(method="balanced_kmeans", balance_slack=0.1), 4, seed=0)
    assert max(result.sizes) <= int(np.ceil(1.1 * len(vectors) / 4))
    assert sum(result.sizes) == len(vectors)


def test_random_split_is_even_and_seeded(embedded_sample):
    vectors, _ = embedded_sample
    a = fit_clusters(vectors, ClusterConfig(method="random"), 4, seed=3)
    b = fit_clusters(vectors, ClusterConfig(method="random"), 4, seed=3)
    assert np.array_equal(a.assignments, b.assignments) and max(a.sizes) - min(a.sizes) <= 1


def test_sentence_mode_embeds(embedded_sample):
    vectors = Embedder(EmbedConfig(mode="sentence", batch_size=8))(["a cat sat", "the kernel panicked"])
    assert vectors.shape == (2, 384) and np.isfinite(vectors).all()


def test_too_few_documents():
    with pytest.raises(ValueError, match="num_experts"):
        fit_clusters(np.zeros((3, 8)), ClusterConfig(), num_clusters=4, seed=0)
