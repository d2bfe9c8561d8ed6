"""The streaming data path at corpus scale: documents/s and peak resident memory of every data stage.

    python benchmarks/data_scale.py --documents 100000 1000000 [--ray]

For each size a corpus is built once, reproducibly (seed 0): each document joins 3 to 8 paragraphs drawn at random
from the bundled corpus's (examples/data/corpus.jsonl; about 1 KB a document, 1 GB at 1M), written as JSONL under
--work. Every stage then runs in a fresh process, so its peak RSS (VmHWM) is its own: `prepare` (read, hash split,
BPE on its bounded sample, tokenize into the token shards), `embed` (paper eq. 1, `token_mean`, into the
memory-mapped matrix), `cluster` (k-means on the bounded sample, every document assigned, one token shard per
cluster) and `train_read` (the batches of `READ_STEPS` optimizer steps drawn from cluster 0's shard, as a submodel
reads them). `rates` compares, on the first `RATE_DOCUMENTS` training documents, the embedder against the embedding
model's fast tokenizer batch-encoding the same texts the same way (`_rates`).
Environment: RATE_DOCUMENTS, SAMPLE_DOCUMENTS (`tokenizer.sample_documents`) shrink the run on a small machine.
`--ray` adds the Ray runner's Ray Data stages (`ray_cluster.data.embed_cluster.embed_stage` + `cluster_stage`: the
fit's sample, the fit, every other document embedded and assigned in one pass; one actor on one cheap node) on the
same train split, in documents embedded per second per worker (the k-means fit left out, as `embed` has none).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
from pathlib import Path

from _common import REPO, peak_rss_mb, run_child

CORPUS = REPO / "examples" / "data" / "corpus.jsonl"
READ_STEPS, READ_BATCH = 2000, 8
RATE_DOCUMENTS = int(os.environ.get("RATE_DOCUMENTS", 20_000))
RATE_PASSES = 2  # over the rate documents; `embed_vs_tokenizer` is the median of the per-block ratios
SAMPLE_DOCUMENTS = int(os.environ.get("SAMPLE_DOCUMENTS", 50_000))  # the BPE's bounded sample (the default)
STAGES = ("prepare", "embed", "cluster", "train_read")


def build_corpus(path: Path, documents: int, seed: int = 0) -> Path:
    """`documents` seeded samples of the bundled corpus's paragraphs, one JSON line each (made once per size)."""
    if path.is_file():
        return path
    paragraphs = [p.strip() for line in CORPUS.open() for p in json.loads(line)["text"].split("\n\n") if p.strip()]
    rng = random.Random(seed)
    partial = path.with_suffix(".partial")
    with partial.open("w") as handle:
        for _ in range(documents):
            text = "\n\n".join(rng.choices(paragraphs, k=rng.randint(3, 8)))
            handle.write(json.dumps({"text": text}) + "\n")
    partial.replace(path)
    return path


def _spec(corpus: Path, job: Path):
    from moedisco.config.loading import build_spec

    return build_spec({"name": "scale", "output_dir": str(job), "data": {"train": str(corpus), "sequence_length": 256},
                       "tokenizer": {"vocab_size": 8192, "sample_documents": SAMPLE_DOCUMENTS},
                       "cluster": {"method": "kmeans"}})


def _stage(name: str, spec) -> dict:
    from moedisco.job.layout import JobPaths
    from moedisco.job.metrics import MetricsWriter
    from moedisco.job.registry import Task
    from moedisco.stages.cluster import stage_cluster, train_source
    from moedisco.stages.embed import stage_embed
    from moedisco.stages.prepare import stage_prepare
    from moedisco.stages.stage_run import StageRun

    paths = JobPaths(spec.output_dir)
    if name == "train_read":
        source = train_source(spec, paths, expert=0)
        started = time.perf_counter()
        for step in range(READ_STEPS):
            source.batch(step, READ_BATCH, seed=0)
        seconds = time.perf_counter() - started
        return {"sequences": READ_STEPS * READ_BATCH, "seconds": seconds,
                "sequences_per_s": READ_STEPS * READ_BATCH / seconds, "cluster_sequences": len(source)}
    functions = {"prepare": stage_prepare, "embed": stage_embed, "cluster": stage_cluster}
    started = time.perf_counter()
    summary = functions[name](StageRun(spec, paths, MetricsWriter(paths.metrics), Task(name), progress=False))
    seconds = time.perf_counter() - started
    documents = summary.get("train_documents", 0) + summary.get("eval_documents", 0) or summary.get("documents") or sum(
        summary.get("sizes", []))
    return {"documents": documents, "seconds": seconds, "docs_per_s": documents / seconds,
            **{k: v for k, v in summary.items() if k in ("train_documents", "eval_documents", "train_tokens", "sizes")}}


def _rates(spec) -> dict:
    """Embedder against the fast tokenizer's own batch encode (the Rust `encode_batch_fast`, truncated as the
    embedder truncates), both on the same blocks of the same texts, one right after the other, so a load change on
    a shared machine hits both; the ratio is the median over the blocks' pairs (the totals' ratio beside it). The
    Hugging Face wrapper's call, what the embedder used before, for reference."""
    import itertools

    import numpy as np

    from moedisco.io.documents import iter_texts
    from moedisco.job.layout import JobPaths
    from moedisco.stages.embed import TOKEN_MEAN_BLOCK, Embedder

    texts = list(itertools.islice(iter_texts(JobPaths(spec.output_dir).texts("train")), RATE_DOCUMENTS))
    embedder = Embedder(spec.embed)
    embedder(texts[:256])  # warm: kernels and thread pools
    blocks = [texts[s : s + TOKEN_MEAN_BLOCK] for s in range(0, len(texts), TOKEN_MEAN_BLOCK)]
    max_length = spec.embed.max_length - 2
    sides = {"tokenizer": lambda b: embedder.encoder.encode_batch_fast(b, add_special_tokens=False),
             "embed": embedder,
             "hf_tokenizer_call": lambda b: embedder.tokenizer(b, add_special_tokens=False, truncation=True,
                                                               max_length=max_length)}
    seconds, ratios = dict.fromkeys(sides, 0.0), {"tokenizer": [], "hf_tokenizer_call": []}
    for block in blocks * RATE_PASSES:
        took = {}
        for name, work in sides.items():
            started = time.perf_counter()
            work(block)
            took[name] = time.perf_counter() - started
            seconds[name] += took[name]
        for name in ratios:  # paired on one block, moments apart: a load burst on a shared machine hits one pair
            ratios[name].append(took[name] / took["embed"])
    documents = len(texts) * RATE_PASSES
    return {"documents": documents, "blocks": len(ratios["tokenizer"]),
            **{f"{name}_docs_per_s": documents / s for name, s in seconds.items()},
            "embed_vs_tokenizer": float(np.median(ratios["tokenizer"])),
            "embed_vs_tokenizer_totals": seconds["tokenizer"] / seconds["embed"],
            "embed_vs_hf_tokenizer_call": float(np.median(ratios["hf_tokenizer_call"]))}


def _ray_data(spec, fit_cap: int) -> dict:
    import ray

    from moedisco.io.storage import join, remove_tree
    from moedisco.job.layout import JobPaths
    from ray_cluster.data.embed_cluster import cluster_stage, embed_stage
    from ray_cluster.local_cluster import LocalClusterSpec, start_local_cluster, stop_local_cluster
    from ray_cluster.placement import job_storage, on_driver_node

    # The cheap node is given this machine's CPUs, so the one worker has what the in-process `embed` has: the
    # embedding actor sizes its tokenizer's threads by its node (`ray_cluster.data.shards.parallel_tokenizer`). And an
    # object store of 1 GB a node, not the local cluster's 150 MB (sized for tests with many nodes; Ray's own
    # default is 30% of RAM): in 150 MB Ray Data's backpressure held the actor to about 3500 docs/s at 1M when the
    # embeddings left the actors.
    start_local_cluster(spec=LocalClusterSpec(num_cheap=1, cpus_per_node=float(len(os.sched_getaffinity(0))),
                                              object_store_mb=1024))
    paths, where = JobPaths(spec.output_dir), on_driver_node()
    for earlier in ("corpus", "embeddings", "assigned"):  # a fresh job's: no index or saved pass rows to reuse
        remove_tree(join(job_storage(spec), earlier))
    try:
        if not ray.is_initialized():
            ray.init(address="auto")
        embedded = ray.get(ray.remote(embed_stage).options(**where).remote(spec, paths, 1, fit_cap))
        clustered = ray.get(ray.remote(cluster_stage).options(**where).remote(spec, paths, 1))
    finally:
        ray.shutdown()
        stop_local_cluster()
    # Every document is embedded once: the fit's in the embed stage, the rest in the cluster stage's pass. The
    # k-means fit, which the in-process `embed` does not do either, is left out of the rate.
    embedding_seconds = embedded["seconds"] + clustered.get("assign_seconds", 0.0)
    workers = max(embedded["num_nodes"], clustered["num_nodes"])
    return {"documents": embedded["corpus_documents"], "fit_documents": clustered["fit_documents"],
            "embed_stage_seconds": embedded["seconds"], "index_seconds": embedded["index_seconds"],
            "fit_seconds": clustered["fit_seconds"], "assign_seconds": clustered.get("assign_seconds", 0.0),
            "embedding_seconds": embedding_seconds, "workers": workers, "sizes": clustered["sizes"],
            "cpus_per_worker": len(os.sched_getaffinity(0)),
            "docs_per_s_per_worker": embedded["corpus_documents"] / embedding_seconds / workers}


def child(payload: dict) -> dict:
    spec = _spec(Path(payload["corpus"]), Path(payload["job"]))
    if payload["stage"] == "ray_data":
        result = _ray_data(spec, payload["fit_cap"])
    else:
        result = _rates(spec) if payload["stage"] == "rates" else _stage(payload["stage"], spec)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {**result, "peak_rss_mb": round(max(own, peak_rss_mb()), 1)}


def run_size(documents: int, work: Path, ray_too: bool, only: list[str] | None = None,
             fit_cap: int = 100_000) -> dict:
    corpus = build_corpus(work / f"corpus_{documents}.jsonl", documents)
    job = work / f"job_{documents}"
    import shutil

    if not only:  # `--only` runs some stages again on the job folder the last run left
        shutil.rmtree(job, ignore_errors=True)
    out = {"corpus_mb": round(corpus.stat().st_size / 2**20, 1)}
    for stage in only or (*STAGES, "rates", *(("ray_data",) if ray_too else ())):
        out[stage] = run_child(__file__, {"corpus": str(corpus), "job": str(job), "stage": stage, "fit_cap": fit_cap})
        print(stage, out[stage], file=sys.stderr, flush=True)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/data/scale"))
    parser.add_argument("--ray", action="store_true", help="Also time the Ray runner's Ray Data stages.")
    parser.add_argument("--fit-cap", type=int, default=100_000,
                        help="Documents the Ray runner's k-means fit sees (`max_fit_documents`); the rest are "
                             "assigned in the cluster stage's pass.")
    parser.add_argument("--only", nargs="+", choices=(*STAGES, "rates", "ray_data"),
                        help="Run only these stages, on the job folders an earlier run left.")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    sizes = {str(n): run_size(n, args.work, args.ray, args.only, args.fit_cap) for n in args.documents}
    result = {"sizes": sizes}
    if len(args.documents) >= 2 and not args.only:
        small, large = sizes[str(min(args.documents))], sizes[str(max(args.documents))]
        result["peak_ratio_large_vs_small"] = {s: round(large[s]["peak_rss_mb"] / small[s]["peak_rss_mb"], 3)
                                               for s in STAGES}
        result["max_peak_rss_mb"] = max(v["peak_rss_mb"] for size in sizes.values() for k, v in size.items()
                                        if isinstance(v, dict))
    for size in sizes.values():
        if "ray_data" in size and "embed" in size:
            size["ray_vs_in_process_per_worker"] = round(
                size["ray_data"]["docs_per_s_per_worker"] / size["embed"]["docs_per_s"], 3)
    return result


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
    else:
        print(json.dumps(main(), indent=2))
