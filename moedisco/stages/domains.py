"""Held-out loss per domain of a model's whole lineage: how an extension or a retirement moved each corpus.

    domains = lineage_domains(Path("runs/extended"))    # the base job's clusters, then the extension's
    losses = domain_losses(Path("runs/extended/final"), domains)      # {"tiny/cluster 0": 4.61, ...}

A domain is one cluster of one job of the lineage (the job, the job it extended, and so on back to the first), named
by the declared domain (`cluster.method: field`) or the cluster's number; its held-out documents are those the
clustering assigned to it (`moedisco.stages.cluster.eval_assignments`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from moedisco.config.loading import load_saved_spec
from moedisco.job.layout import JobPaths
from moedisco.job.provenance import PROVENANCE_KEY, ancestry, base_job
from moedisco.stages.cluster import cluster_eval_sequences
from moedisco.stages.merge import group_losses

EVAL_SEQUENCES = 64  # held-out sequences per domain (8 batches of 8): an extension and a retirement measure alike


@dataclass(frozen=True)
class Domain:
    name: str  # "<job>/<domain or cluster k>", the job's name with its place in the lineage where two share it
    job: str  # the job folder whose corpus it is
    sequences: torch.Tensor  # held-out [N, L]


@dataclass(frozen=True)
class Ancestor:
    """A job of a model's lineage, and which of its clusters' experts the model still has."""

    folder: Path
    clusters: tuple[int, ...]
    recorded: str = ""  # the job's output_dir as its experts' provenance names it (a URI for object storage)


def lineage(folder: Path) -> list[Ancestor]:
    """The jobs whose corpora the model of job `folder` was trained on, oldest first: of `ancestry(folder)` (the job
    and, through each `extend.base` and `retire.base`, the jobs before it), those that trained experts. A job's
    clusters are those whose experts the model still has (its `moedisco_experts` record): a retired expert's corpus
    is no longer the model's to replay or to be measured on."""
    chain = [Ancestor(job, tuple(range(spec.num_clusters)), _place(str(spec.output_dir)))
             for job, spec in ancestry(folder) if spec.method in ("moe_disco", "extend")]
    return _surviving(folder, chain[::-1])


def _place(output_dir: str) -> str:
    """An output_dir as provenance records compare: a URI as it is, a folder resolved."""
    return output_dir if "://" in output_dir else str(Path(output_dir).resolve())


def _surviving(folder: Path, chain: list[Ancestor]) -> list[Ancestor]:
    """`chain` with each job's clusters cut to those whose experts the newest final model has: `folder`'s, or,
    while `folder`'s job has none yet (an extension running), its base's, the job's own clusters all kept. A job
    the record does not name has no expert left, unless the record names none of the chain (a model moedisco did
    not write, or jobs moved since): then nothing can be told, and every cluster stays."""
    holder, running = base_job(folder), set()
    if not (holder / "final" / "config.json").is_file() and (holder / "spec.yaml").is_file():
        spec = load_saved_spec(holder / "spec.yaml")
        section = spec.extend if spec.method == "extend" else spec.retire if spec.method == "retire" else None
        running, holder = {holder.resolve()}, base_job(section.base) if section is not None else holder
    final = holder / "final" / "config.json"
    record = json.loads(final.read_text()).get(PROVENANCE_KEY) if final.is_file() else None
    kept: dict[str, set[int]] = {}
    for entry in record or []:
        if "output_dir" in entry and "cluster" in entry:
            kept.setdefault(_place(str(entry["output_dir"])), set()).add(int(entry["cluster"]))

    def names(ancestor: Ancestor) -> set[int] | None:
        found = [kept[key] for key in {ancestor.recorded, str(ancestor.folder.resolve())} if key in kept]
        return set().union(*found) if found else None

    if not any(names(a) is not None for a in chain):
        return chain
    return [a if a.folder.resolve() in running else
            Ancestor(a.folder, tuple(k for k in a.clusters if k in (names(a) or ())), a.recorded) for a in chain]


def cluster_names(paths: JobPaths, count: int) -> list[str]:
    """The declared domains of a job's clusters (`cluster.method: field`), else `cluster <k>`."""
    summary = paths.clusters / "clusters.json"
    declared = json.loads(summary.read_text()).get("domains") if summary.is_file() else None
    return list(declared) if declared and len(declared) == count else [f"cluster {k}" for k in range(count)]


def job_domains(ancestor: Ancestor, sequences: int, label: str, own: bool) -> list[Domain]:
    """Each kept cluster of a lineage job with at least one held-out sequence, at most `sequences` of them, named
    `<label>/<domain>`. Another job's folder (`own` False) is only read."""
    spec, paths = load_saved_spec(ancestor.folder / "spec.yaml"), JobPaths(ancestor.folder)
    held_out = cluster_eval_sequences(spec, paths, cache=own)
    names = cluster_names(paths, len(held_out))
    return [Domain(f"{label}/{names[k]}", str(ancestor.folder), held_out[k][:sequences])
            for k in ancestor.clusters if len(held_out[k])]


def lineage_domains(folder: Path, own: Path | None = None, sequences: int = EVAL_SEQUENCES) -> list[Domain]:
    """The domains of every job of `folder`'s lineage; a job is named by its spec's name, or with its place in the
    lineage (`name#2`) where two share one. Only `own`, the running job's folder, may get a cache written (the held-
    out documents' clusters); every other job's folder is only read."""
    jobs = lineage(folder)
    names = [load_saved_spec(a.folder / "spec.yaml").name for a in jobs]
    labels = [name if names.count(name) == 1 else f"{name}#{i}" for i, name in enumerate(names)]
    mine = own.resolve() if own is not None else None
    return [domain for ancestor, label in zip(jobs, labels)
            for domain in job_domains(ancestor, sequences, label, ancestor.folder.resolve() == mine)]


def domain_losses(model: Path, domains: list[Domain], batch_size: int = 8) -> dict[str, float]:
    """Held-out loss of the model saved in `model` on each domain, in one pass over its layers."""
    losses = group_losses(model, [domain.sequences for domain in domains], batch_size)
    return {domain.name: loss for domain, loss in zip(domains, losses)}
