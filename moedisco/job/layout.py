"""The job folder's layout: where every stage reads and writes, in one place that imports nothing heavy.

    paths = JobPaths(spec.output_dir)
    paths.metrics                     # OUTPUT/metrics.jsonl
    paths.run_dir("submodel", 2)      # OUTPUT/submodels/2 (a training stage's run folder)
    mark_done(paths, "merge", summary); is_done(paths, "merge"); stage_result(paths, "merge")

Every layer uses it (the stages, both runners, the Ray workers, the service), and it imports no torch. The folder:

    OUTPUT/
      spec.yaml  metrics.jsonl  cost.json  report.png  evaluation.json
      owner.json (the claim: the runner that may write here)
      data/{train,eval}.jsonl  data/split.json  data/{train,eval}_tokens/ (token shards)  data/tokenizer/
      embed/embeddings.npy  embed/progress.json  cluster/  cluster/tokens_<k>/ (cluster k's token shard)
      source/  branched/
      submodels/<k>/            a submodel's run folder (checkpoints/, model.safetensors, result.json)
      sync/round_<r>.safetensors  sync/outer_<r>.safetensors (the outer optimizer's state after round r)
      runs/<stage>/             the run folder of warmup, finetune, full_parameter
      anneal/step_<n>/          a stopped fine-tune's stable checkpoint n, decayed (`moedisco.stages.finetune.anneal`)
      replay/<i>/               an extension's copy of lineage job i's replayed clusters (`moedisco.stages.extend`)
      merged/  final/
      stages/<marker>.json      one per finished stage (its summary)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from moedisco.io import staging, storage
from moedisco.io.atomic import write_atomically


@dataclass(frozen=True)
class JobPaths:
    """`root` is the job folder; for an `output_dir` on object storage, its local staging folder, and `remote`
    the URI it is copied to (`moedisco.io.storage`: memory-mapped shards need local files)."""

    root: Path
    remote: str | None = None

    def __post_init__(self) -> None:
        if storage.is_uri(self.root):
            object.__setattr__(self, "remote", str(self.root))
            object.__setattr__(self, "root", staging.staging_dir(str(self.root)))
        object.__setattr__(self, "root", Path(self.root))

    def pull(self) -> None:
        """A job folder on object storage: copy down what this machine's staging folder lacks (a resume)."""
        if self.remote is not None:
            staging.pull(self.remote, self.root)

    def push(self) -> None:
        """A job folder on object storage: copy up what changed here since the last push."""
        if self.remote is not None:
            staging.push(self.root, self.remote)

    spec = property(lambda self: self.root / "spec.yaml")
    # The claim keeps the file name of earlier versions: during an upgrade an old runner and a new one must see the
    # same claim, or the old one would go on writing after the new one took the folder over.
    claim = property(lambda self: self.root / "owner.json")
    data = property(lambda self: self.root / "data")
    tokenizer = property(lambda self: self.root / "data" / "tokenizer")
    embeddings = property(lambda self: self.root / "embed" / "embeddings.npy")
    clusters = property(lambda self: self.root / "cluster")
    source = property(lambda self: self.root / "source")
    branched = property(lambda self: self.root / "branched")
    merged = property(lambda self: self.root / "merged")
    final = property(lambda self: self.root / "final")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    cost = property(lambda self: self.root / "cost.json")
    report = property(lambda self: self.root / "report.png")
    evaluation = property(lambda self: self.root / "evaluation.json")  # downstream task scores (evaluate stage)
    markers = property(lambda self: self.root / "stages")
    submodels = property(lambda self: self.root / "submodels")

    def texts(self, split_name: str) -> Path:
        """One JSON line ({"text": ...}; with `cluster.method: field`, also "domain") per document of the `train` or
        `eval` split."""
        return self.data / f"{split_name}.jsonl"

    def tokens(self, split_name: str) -> Path:
        """The split's token shard (`moedisco.io.token_shards`), in document order."""
        return self.data / f"{split_name}_tokens"

    split_summary = property(lambda self: self.root / "data" / "split.json")  # written once the split is whole
    embed_progress = property(lambda self: self.root / "embed" / "progress.json")  # embedded rows so far

    def cluster_tokens(self, expert: int) -> Path:
        """Cluster `expert`'s token shard: its training documents in corpus order."""
        return self.clusters / f"tokens_{expert}"

    def submodel(self, expert: int) -> Path:
        return self.submodels / str(expert)

    def run(self, stage: str) -> Path:
        return self.root / "runs" / stage

    def replay(self, index: int) -> Path:
        """An extension's copy of what it replays of lineage job `index` (the clusters whose experts remain)."""
        return self.root / "replay" / str(index)

    def anneal(self, step: int) -> Path:
        return self.root / "anneal" / f"step_{step}"

    def run_dir(self, stage: str, expert: int | None = None) -> Path:
        """A training stage's run folder: a submodel's is its own folder, the others' are under runs/."""
        return self.submodel(expert) if stage == "submodel" else self.run(stage)

    def marker(self, name: str) -> Path:
        return self.markers / f"{name}.json"

    def sync_average(self, round_index: int) -> Path:
        return self.root / "sync" / f"round_{round_index}.safetensors"

    def outer_state(self, round_index: int) -> Path:
        """`branch.outer_optimizer: nesterov`: the backbone and momentum after round `round_index`'s sync."""
        return self.root / "sync" / f"outer_{round_index}.safetensors"


class ClaimLost(RuntimeError):
    """Another runner took the job folder over (its claim file names that runner): this one stops, writing
    nothing more, and leaves the job to it."""


def claim(paths: JobPaths, runner: str) -> None:
    """Make `runner` the job folder's claimant: a runner that finds another name there has been replaced."""
    write_atomically(paths.claim, json.dumps({"runner": runner, "pid": os.getpid()}))


def claimant_of(paths: JobPaths) -> str | None:
    """The runner named in the claim file; None when there is none or it cannot be read right now."""
    try:
        return json.loads(paths.claim.read_text())["runner"]
    except (OSError, ValueError, KeyError):
        return None


def check_claim(paths: JobPaths, runner: str | None) -> None:
    """Raise `ClaimLost` when the folder names another runner than `runner` (None: nobody claimed it). A file that
    cannot be read (a network filesystem's hiccup) is no proof of a takeover, so it is not one."""
    current = claimant_of(paths)
    if runner is not None and current is not None and current != runner:
        raise ClaimLost(f"{paths.root} now belongs to runner {current}, not {runner}")


def is_done(paths: JobPaths, marker: str) -> bool:
    """True when the stage's marker holds its summary; an unreadable one (truncated by a crash of an older
    moedisco, which wrote markers in place) means the stage runs again, which every stage may."""
    try:
        json.loads(paths.marker(marker).read_text())
    except (OSError, ValueError):
        return False
    return True


def mark_done(paths: JobPaths, marker: str, summary: dict) -> dict:
    """Write the stage's summary as its marker, atomically: a marker that exists is complete."""
    write_atomically(paths.marker(marker), json.dumps(summary, indent=2))
    return summary


def stage_result(paths: JobPaths, marker: str) -> dict:
    return json.loads(paths.marker(marker).read_text())
