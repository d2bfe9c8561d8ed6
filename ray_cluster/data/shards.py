"""The train split as Parquet shards of (doc_id, text), and a pool of actors over them: what the data stages share.

    num_docs = index_corpus(paths.texts("train"), join(job_storage(spec), "corpus"), spec.data.rows_per_shard)
    shards = shard_ranges(corpus, num_docs)        # [{"shard": location, "first": 0, "stop": 4096}, ...]
    dataset, max_actors = through_actors(shards, EmbedBatches, kwargs, max_nodes, options)

train.jsonl is streamed into shards of `data.rows_per_shard` documents whose `doc_id` is the document's line, so
document order, and every later index into the cluster assignments, matches the local runner; a marker
(`_index.json`) records what was indexed, so the prepare stage, the embed stage and a re-run share the shards. A
stage's actors (one per node of the stage's tier at most, the pool growing as nodes come: the nodes it holds are
what the stage costs) each read their own shards from storage: Ray Data moves the shards' locations, not their
texts.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from moedisco.io.storage import filesystem, is_uri, join, list_files, make_dir, open_input, remove_tree
from ray_cluster.placement import node_cpus

INDEX_MARKER = "_index.json"  # Parquet readers skip names starting with "_"
SHARD_NAME = "corpus-{:010d}.parquet"  # by its first doc_id: the names sort in corpus order
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


def fs_path(location: Path | str):
    """(pyarrow filesystem, path in it) of a local path or an object-storage URI."""
    return filesystem(str(location) if is_uri(location) else str(Path(location).resolve()))


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


def index_corpus(train_jsonl: Path, out_dir: Path | str, rows_per_shard: int) -> int:
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
    """The shards as a dataset of their locations, a block each: every actor reads its own shards (a Ray Data read
    task per shard would move every text through the object store)."""
    return ray.data.from_items(ranges, override_num_blocks=max(1, len(ranges)))


# Ray Data's own cluster autoscaler asks the cluster for what its operators could use, as bundles without labels
# ({"CPU": 1, "GPU": 1}) that Ray's autoscaler may meet with any node type having them: an A100 node for an embedding
# pool, a cheap node launched for a request that outlives the stage. The pools' pending actors, which carry their
# tier's label selector, are the demand instead (`through_actors`), so a data stage's driver runs with Ray Data's
# scale-up deltas at zero: it asks for no more than the cluster has.
NO_RAY_DATA_SCALE_UP = {f"RAY_DATA_DEFAULT_CLUSTER_SCALING_UP_MAX_{kind}_RESOURCE_DELTA": "0"
                        for kind in ("CPU", "GPU", "MEMORY")}


def through_actors(shards: list[dict], udf: type, kwargs: dict, max_nodes: int, options: dict,
                   shards_per_call: int = 1) -> tuple[ray.data.Dataset, int]:
    """`shards` through a pool of `udf` actors, one per node of the tier, up to `max_nodes` (the tier's nodes, or
    the most its node groups may grow to when an autoscaler adds them) and no more than there are shards. Returns the
    dataset and the pool's largest size.

    The pool asks for all its actors at once and works with those that have started: the pending ones are the
    demand that makes the cluster's autoscaler add nodes, each actor starting as its node comes up. (Ray Data grows
    a pool only within the resources the cluster has now, so a pool that started with one actor on a cluster scaled
    from zero would never ask for a second node.) Idle actors go as the work runs out, down to one."""
    max_actors = max(1, min(max_nodes, len(shards)))
    pool = ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors, initial_size=max_actors)
    return shard_dataset(shards).map_batches(
        udf, fn_constructor_kwargs=kwargs, batch_size=max(1, min(shards_per_call, len(shards))),
        batch_format="numpy", compute=pool, **options), max_actors


def read_shard(location: str, keep_N: np.ndarray | None = None) -> pa.Table:
    """A shard's (doc_id, text) rows, only those `keep_N` flags when given (on Arrow: no text is converted)."""
    table = pq.read_table(open_input(location, seekable=True), columns=["doc_id", "text"])
    return table if keep_N is None else table.filter(pa.array(keep_N[table["doc_id"].to_numpy()]))
