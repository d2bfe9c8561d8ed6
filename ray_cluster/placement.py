"""Where a stage runs: tier label selectors, device detection, storage locations. Light to import on purpose
(no torch), since every Ray worker that unpickles a stage's function imports it.

    label_selector(spec, spec.resources.submodel_tier)   # {"gpu_type": "4090"}
    storage_root(spec)                                   # resources.storage_path, else output_dir
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import ray

from moedisco import stages
from moedisco.config import JobSpec, TierConfig
from ray_cluster.cluster import nodes_with_label


def storage_root(spec: JobSpec) -> Path:
    return Path(spec.resources.storage_path or spec.output_dir).resolve()


def job_key(spec: JobSpec) -> str:
    """The job's folder name on shared storage: its name (for people) and a digest of its output_dir (one per
    job), so two jobs of the same name on one storage path never share, restore or delete each other's files."""
    digest = hashlib.sha256(str(Path(spec.output_dir).resolve()).encode()).hexdigest()[:12]
    return f"{spec.name}-{digest}"


def job_storage(spec: JobSpec) -> Path:
    """Ray's own files of this job (corpus and embedding shards, per-cluster shards, Ray Train runs)."""
    return storage_root(spec) / job_key(spec)


def run_name(spec: JobSpec, stage: str, expert: int | None, round_index: int | None = None) -> str:
    """Ray Train's run name, under the job's storage folder; every synchronisation round but the last is a run
    of its own, so that a restarted worker restores the round's own checkpoints, not an earlier round's copy
    from before its sync."""
    key = job_key(spec)
    name = f"{key}/{stage}" if expert is None else f"{key}/{stage}_{expert}"
    last = round_index is None or round_index == spec.branch.sync_rounds - 1
    return name if last else f"{name}_round_{round_index}"


def tier_of(spec: JobSpec, stage: str) -> TierConfig:
    """The tier a stage is placed on: its declared one; free set-up work goes to the cheap tier."""
    return stages.tier_of(spec.resources, stage) or spec.resources.submodel_tier


def label_selector(spec: JobSpec, tier: TierConfig) -> dict[str, str]:
    return {spec.resources.label_key: tier.label}


def tier_nodes(spec: JobSpec, tier: TierConfig) -> list[dict]:
    return nodes_with_label(spec.resources.label_key, tier.label)


def tier_has_gpu(spec: JobSpec, tier: TierConfig) -> bool:
    """Workers ask for a GPU only when the tier's nodes have one (the simulated tiers are CPU-only)."""
    return any(n["resources"].get("GPU", 0) > 0 for n in tier_nodes(spec, tier))


def on_driver_node() -> dict:
    """Options that keep a zero-CPU coordinating task or actor on the driver's node, as Ray Train does with its
    controller: it is no work for the tiers, and it goes away with the driver."""
    return {"num_cpus": 0, "label_selector": {"ray.io/node-id": ray.get_runtime_context().get_node_id()}}
