"""Held-out loss per domain of a model's whole lineage: how an extension or a retirement moved each corpus.

    domains = lineage_domains(Path("runs/extended"), sequences=64)   # the base job's clusters, then the extension's
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
from moedisco.stages.cluster import cluster_eval_sequences
from moedisco.stages.merge import group_losses


@dataclass(frozen=True)
class Domain:
    name: str  # "<job>/<domain or cluster k>"
    job: str  # the job folder whose corpus it is
    sequences: torch.Tensor  # held-out [N, L]


def lineage(folder: Path) -> list[Path]:
    """The job folders whose corpora the model of job `folder` was trained on, oldest first: `folder` and, through
    each `extend.base` (and a retirement's `retire.base`), the jobs before it. A bare model folder ends it."""
    chain, seen = [], set()
    current: Path | None = folder
    while current is not None and (current / "spec.yaml").is_file() and current.resolve() not in seen:
        seen.add(current.resolve())
        spec = load_saved_spec(current / "spec.yaml")
        if spec.method in ("moe_disco", "extend"):
            chain.append(current)
        section = spec.extend if spec.method == "extend" else spec.retire if spec.method == "retire" else None
        current = section.base if section is not None else None
    return chain[::-1]


def cluster_names(paths: JobPaths, count: int) -> list[str]:
    """The declared domains of a job's clusters (`cluster.method: field`), else `cluster <k>`."""
    summary = paths.clusters / "clusters.json"
    declared = json.loads(summary.read_text()).get("domains") if summary.is_file() else None
    return list(declared) if declared and len(declared) == count else [f"cluster {k}" for k in range(count)]


def job_domains(folder: Path, sequences: int) -> list[Domain]:
    """Each cluster of the job in `folder` with at least one held-out sequence, at most `sequences` of them."""
    spec, paths = load_saved_spec(folder / "spec.yaml"), JobPaths(folder)
    held_out = cluster_eval_sequences(spec, paths)
    names = cluster_names(paths, len(held_out))
    return [Domain(f"{spec.name}/{name}", str(folder), seqs_NL[:sequences])
            for name, seqs_NL in zip(names, held_out) if len(seqs_NL)]


def lineage_domains(folder: Path, sequences: int) -> list[Domain]:
    return [domain for job in lineage(folder) for domain in job_domains(job, sequences)]


def domain_losses(model: Path, domains: list[Domain], batch_size: int = 8) -> dict[str, float]:
    """Held-out loss of the model saved in `model` on each domain, in one pass over its layers."""
    losses = group_losses(model, [domain.sequences for domain in domains], batch_size)
    return {domain.name: loss for domain, loss in zip(domains, losses)}


def loss_changes(before: dict[str, float], after: dict[str, float]) -> list[dict]:
    """Per domain: the loss before, after and the change (after - before; None where one side was not measured)."""
    return [{"domain": name, "before": before.get(name), "after": after.get(name),
             "change": after[name] - before[name] if name in before and name in after else None}
            for name in dict.fromkeys([*before, *after])]
