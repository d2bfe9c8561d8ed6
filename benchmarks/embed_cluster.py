"""Data decoupling throughput: Ray Data embedding + clustering with 1 and 2 cheap nodes vs one process.

    python benchmarks/embed_cluster.py [--quick] [--documents 3000]

For each node count a fresh local simulated cluster is started (not timed); the timed part is
`ray_cluster.data.embed_cluster.embed_stage` + `cluster_stage` (the Ray runner's stages) on the bundled corpus's
train split.
The single-process reference is `moedisco.stages.embed.Embedder` + `moedisco.stages.cluster.fit_clusters`
on the same documents.
Reports documents per second and the k-means objective of each fit (in-process vs on Ray, with `--fit-sample` to
exercise the sampled fit used for corpora too large to fit in one process).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import REPO

from moedisco.config.loading import build_spec
from moedisco.io.documents import load_texts
from moedisco.job.layout import JobPaths
from moedisco.job.metrics import MetricsWriter
from moedisco.job.registry import Task
from moedisco.stages.cluster import fit_clusters
from moedisco.stages.embed import Embedder
from moedisco.stages.prepare import stage_prepare
from moedisco.stages.stage_run import StageRun


def _spec(out: Path, documents: int):
    return build_spec({"name": "bench", "output_dir": str(out), "data": {
        "train": str(REPO / "examples" / "data" / "corpus.jsonl"), "max_documents": documents, "eval_fraction": 0.02},
        "tokenizer": {"vocab_size": 512}})


def in_process(spec, paths) -> dict:
    texts = load_texts(paths.texts("train"))
    started = time.perf_counter()
    vectors = Embedder(spec.embed)(texts)
    result = fit_clusters(vectors, spec.cluster, spec.model.num_experts, spec.seed)
    seconds = time.perf_counter() - started
    return {"documents": len(texts), "seconds": seconds, "docs_per_s": len(texts) / seconds, "inertia": result.inertia}


def on_ray(spec, paths, num_cheap: int, fit_sample: int) -> dict:
    import ray

    from ray_cluster.data.embed_cluster import cluster_stage, embed_stage
    from ray_cluster.local_cluster import LocalClusterSpec, start_local_cluster, stop_local_cluster
    from ray_cluster.placement import on_driver_node

    start_local_cluster(spec=LocalClusterSpec(num_cheap=num_cheap))
    try:
        if not ray.is_initialized():
            ray.init(address="auto")
        # Ray Data runs inside a task on the driver's node, exactly as the Ray runner places these stages.
        where = on_driver_node()
        started = time.perf_counter()
        embedded = ray.get(ray.remote(embed_stage).options(**where).remote(spec, paths, num_cheap, fit_sample))
        clustered = ray.get(ray.remote(cluster_stage).options(**where).remote(spec, paths, num_cheap))
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
        stop_local_cluster()
    return {"nodes": num_cheap, "documents": embedded["corpus_documents"], "seconds": seconds,
            "docs_per_s": embedded["corpus_documents"] / seconds, "embed_seconds": embedded["seconds"],
            "cluster_seconds": clustered["seconds"], "inertia": clustered["inertia"],
            "fit_documents": clustered["fit_documents"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=3000)
    parser.add_argument("--fit-sample", type=int, default=1000, help="Documents the Ray k-means fit samples.")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    documents = 1000 if args.quick else args.documents
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = _spec(Path(tmp) / "job", documents)
        paths = JobPaths(spec.output_dir)
        stage_prepare(StageRun(spec, paths, MetricsWriter(paths.metrics), Task("prepare")))
        reference = in_process(spec, paths)
        for nodes in (1, 2):
            rows.append(on_ray(spec, paths, nodes, args.fit_sample))
    for row in rows:
        row["speed_vs_single_process"] = row["docs_per_s"] / reference["docs_per_s"]
        row["objective_vs_in_process"] = row["inertia"] / reference["inertia"] - 1
    result = {"benchmark": "embed_cluster", "single_process": reference, "ray": rows,
              "note": "one 2-core machine: the simulated nodes share the same two cores"}
    print(json.dumps(result, indent=1, default=float))
    return result


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
