"""Extending a finished MoE with experts for a new corpus (`method: extend`), on the paper's cheap/expensive split.

    spec = with_checkpoint_model(load_spec("extend.yaml"))   # model and tokenizer: the base's (models.experts)
    stage_source(run)     # source/: the base's backbone + one expert per new cluster, copied from the base
    stage_submodel(...)   # (moedisco.stages.branch) each new expert trains on its cluster on the cheap tier
    stage_merge(run)      # merged/: the base's experts + the new ones, router rows from the new clusters' centroids
    stage_finetune(run)   # final/: a brief fine-tune (router only, or all), the base's corpus replayed beside the new

The new corpus is prepared with the base's tokenizer and clustered into `extend.new_experts` clusters. Each new
expert starts as a copy, per layer, of the base expert whose router row is closest to its cluster's mean hidden state
(the expert the base already sends that data to), and its router row is that mean state, scaled to the base's rows.
With `extend.shared: frozen` and `extend.finetune: router` the backbone and the old experts stay the base's, so the
old domains change only through the router; how far each setting moves them: BENCHMARKS §14.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from moedisco.config.spec import JobSpec
from moedisco.io.token_shards import MixedSource, SequenceSource, TokenShard, is_complete
from moedisco.job.layout import JobPaths, stage_result
from moedisco.models.architecture import num_experts_of, parameter_roles, read_config
from moedisco.models.experts import base_model, expert_provenance, layer_of, rewrite_experts
from moedisco.models.weights import WEIGHTS_FILE, SavedWeights
from moedisco.stages import prepare
from moedisco.stages.cluster import ClusterResult, copy_documents, train_source
from moedisco.stages.domains import domain_losses, lineage, lineage_domains
from moedisco.stages.finetune import finetune, save_final
from moedisco.stages.merge import averaging_weights, cluster_provenance, cluster_samples, shared_average
from moedisco.stages.prepare import eval_sequences
from moedisco.stages.router_rows import centroid_router_rows
from moedisco.stages.stage_run import StageRun
from moedisco.training.checkpoint import SECOND_MOMENT_FILE


def new_expert_rows(base: Path, samples: list[torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[int, list[int]]]:
    """Router rows of the new experts, keyed by tensor name ([k, H]: each new cluster's mean hidden state entering
    the router, scaled to the mean norm of the base's rows there), and per layer the base expert each new one
    copies (the one whose row scores that mean state highest)."""
    centroids = centroid_router_rows(base, samples)
    rows, copied = {}, {}
    with SavedWeights(base) as weights:
        for name, unit_kH in centroids.items():
            base_EH = weights.get(name).float()
            copied[layer_of(name)] = (unit_kH @ base_EH.T).argmax(1).tolist()
            rows[name] = unit_kH * base_EH.norm(dim=1).mean()
    return rows, copied


def stage_source(run: StageRun) -> dict:
    """source/: the base's backbone with one expert per new cluster, which the new submodels branch from."""
    spec, paths = run.spec, run.paths
    base = base_model(spec.extend.base)
    rows, copied = new_expert_rows(base, cluster_samples(spec, paths))

    def new_rows(name: str, role: str, tensor: torch.Tensor) -> torch.Tensor:
        return rows[name].to(tensor.dtype) if name in rows else tensor[copied[layer_of(name)]]

    rewrite_experts(base, paths.source, spec.num_clusters, new_rows, provenance=cluster_provenance(spec, paths))
    return {"base": str(base), "base_experts": num_experts_of(read_config(base)), "new_experts": spec.num_clusters,
            "copied_from": {str(layer): experts for layer, experts in copied.items()}}


def base_documents(spec: JobSpec) -> int:
    """Training documents behind the base's shared parameters: every cluster of every job of its lineage (a retired
    expert's corpus trained the backbone too). 0 for a bare model folder (its corpus is unknown)."""
    return sum(sum(ClusterResult.load(JobPaths(job.folder).clusters).sizes) for job in lineage(spec.extend.base))


class _Computed:
    """A safetensors handle's `get_slice`/`keys` over tensors computed here, so that the base takes part in
    `merge._fisher_sum` as one more submodel."""

    def __init__(self, compute: Callable[[str], torch.Tensor], names: set[str]):
        self.compute, self.names = compute, names
        self.last: tuple[str, torch.Tensor] | None = None  # the merge asks for one tensor a block of rows at a time

    def keys(self) -> set[str]:
        return self.names

    def cached(self, name: str) -> torch.Tensor:
        if self.last is None or self.last[0] != name:
            self.last = (name, self.compute(name))
        return self.last[1]

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.cached(name).clone()  # the merge scales what it is given in place

    def get_slice(self, name: str) -> _Rows:
        return _Rows(self, name)


class _Rows:
    def __init__(self, party: _Computed, name: str):
        self.party, self.name = party, name

    def get_shape(self) -> list[int]:
        return list(self.party.cached(self.name).shape)

    def __getitem__(self, rows) -> torch.Tensor:
        return self.party.cached(self.name)[rows].clone()


def base_fisher(stack: ExitStack, spec: JobSpec) -> _Computed | None:
    """The base backbone's diagonal Fisher estimate: sum_k gamma_k F_k over the submodels its jobs merged (their
    AdamW second moments, as the base's own merge weighed them), or None when they are not all there (a bare
    model folder, or jobs trained without `merge.weighting: fisher`). The estimate is of the backbone before the
    base's fine-tune, which moved it little."""
    parties = []
    for job in lineage(spec.extend.base):
        paths = JobPaths(job.folder)
        sizes = ClusterResult.load(paths.clusters).sizes
        files = [paths.submodel(k) / SECOND_MOMENT_FILE for k in range(len(sizes))]
        if not all(path.is_file() for path in files):
            return None
        parties += [(stack.enter_context(safe_open(path, framework="pt")), size) for path, size in zip(files, sizes)]
    if not parties:
        return None
    total = sum(size for _, size in parties)
    names = set.intersection(*(set(handle.keys()) for handle, _ in parties))

    def fisher(name: str) -> torch.Tensor:
        return sum(handle.get_tensor(name).float() * (size / total) for handle, size in parties)

    return _Computed(fisher, names)


def shared_merge(stack: ExitStack, spec: JobSpec, paths: JobPaths, base: SavedWeights,
                 handles: list) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """`extend.shared: merge`: each shared tensor is the mean of the base's and the new submodels', weighted as
    the job's merges weigh (`merge.weighting`): gamma by documents, times each party's Fisher estimate with
    `fisher` (the base's from `base_fisher`, the new submodels' their second moments); by documents alone where a
    party has no estimate of a tensor."""
    sizes = ClusterResult.load(paths.clusters).sizes
    gammas = averaging_weights([base_documents(spec) or sum(sizes), *sizes],
                               "uniform" if spec.merge.weighting == "uniform" else "samples")
    base_party = _Computed(lambda name: base.get(name), set(base.files))
    old_fisher = base_fisher(stack, spec) if spec.merge.weighting == "fisher" else None
    new_fisher = [stack.enter_context(safe_open(paths.submodel(k) / SECOND_MOMENT_FILE, framework="pt"))
                  for k in range(spec.num_clusters)] if old_fisher is not None else None
    with_fisher = (old_fisher.keys() & set.intersection(*(set(h.keys()) for h in new_fisher))
                   if new_fisher else set())

    def shared(name: str, tensor: torch.Tensor) -> torch.Tensor:
        fisher = [old_fisher, *new_fisher] if name in with_fisher else None
        return shared_average(name, [base_party, *handles], gammas, fisher).to(tensor.dtype)

    return shared


def stage_merge(run: StageRun) -> dict:
    """merged/: the base's experts, then the new ones; shared parameters the base's (`frozen`) or merged with the
    new submodels' (`merge`, `shared_merge`)."""
    spec, paths = run.spec, run.paths
    started = time.perf_counter()
    base = base_model(spec.extend.base)
    config = read_config(base)
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(paths.submodel(k) / WEIGHTS_FILE, framework="pt"))
                   for k in range(spec.num_clusters)]

        def rows(name: str, role: str, tensor: torch.Tensor) -> torch.Tensor:
            return torch.cat([tensor] + [handle.get_tensor(name).to(tensor.dtype) for handle in handles])

        base_weights = stack.enter_context(SavedWeights(base))
        shared = None if spec.extend.shared == "frozen" else shared_merge(stack, spec, paths, base_weights, handles)
        new = [{**entry, "base": str(base)} for entry in cluster_provenance(spec, paths)]
        rewrite_experts(base, paths.merged, num_experts_of(config) + spec.num_clusters, rows, shared=shared,
                        provenance=expert_provenance(config) + new)
    prepare.load_tokenizer(paths.tokenizer).save_pretrained(paths.merged)
    domains = lineage_domains(paths.root, own=paths.root)
    before = domain_losses(base, [d for d in domains if d.job != str(paths.root)], spec.finetune.batch_size)
    after = domain_losses(paths.merged, domains, spec.finetune.batch_size)
    seconds = time.perf_counter() - started
    run.metrics.write({"stage": "merge", "step": 0, "eval_loss": _mean(after), "seconds": seconds, "device": "cpu"})
    return {"base": str(base), "domains_base": before, "domains": after, "eval_loss": _mean(after),
            "seconds": seconds}


def _mean(losses: dict[str, float]) -> float | None:
    return sum(losses.values()) / len(losses) if losses else None


def replay_source(spec: JobSpec, paths: JobPaths) -> SequenceSource | MixedSource:
    """What the fine-tune trains on: the new corpus and, `extend.replay_fraction` of every batch, the training
    sequences of the base's lineage, each job's part by its documents, so that the router keeps routing them. Only
    the clusters whose experts the base still has are replayed (a retired expert's corpus is not), read from a copy
    in this job's folder when some were retired (`JobPaths.replay`): another job's folder is only read."""
    new = train_source(spec, paths)
    fraction, seq_len = spec.extend.replay_fraction, spec.data.sequence_length
    old: list[tuple[SequenceSource, int]] = []
    for index, job in enumerate(lineage(spec.extend.base) if fraction > 0 else []):
        job_paths = JobPaths(job.folder)
        clusters = ClusterResult.load(job_paths.clusters)
        kept = np.flatnonzero(np.isin(clusters.assignments, job.clusters))
        if not len(kept):
            continue
        shard = TokenShard.load(job_paths.tokens("train")) if len(kept) == len(clusters.assignments) else (
            TokenShard.load(paths.replay(index)) if is_complete(paths.replay(index))
            else copy_documents(job_paths.tokens("train"), kept, paths.replay(index)))
        if shard.num_tokens >= seq_len:  # a remnant shorter than one sequence has nothing to replay
            old.append((SequenceSource(shard, seq_len), len(kept)))
    if not old:
        return new
    documents = sum(size for _, size in old)
    mixed = MixedSource([new] + [source for source, _ in old],
                        [1.0 - fraction] + [fraction * size / documents for _, size in old])
    for step in range(spec.finetune.steps):  # refused now, not at the step that could not be mixed
        mixed.counts(step, spec.finetune.batch_size)
    return mixed


def stage_finetune(run: StageRun) -> dict:
    """final/: the merged model fine-tuned briefly on the new corpus with the old replayed, the router alone
    (`extend.finetune: router`) or every parameter; its held-out loss per domain, with the base's beside it."""
    spec, paths = run.spec, run.paths
    roles = parameter_roles(read_config(paths.merged))
    router_only = spec.extend.finetune == "router"
    context = run.train_context(spec.seed, lr_scale=(lambda name: float(roles.get(name) == "router"))
                                if router_only else None)
    model, result = finetune(paths.merged, replay_source(spec, paths), eval_sequences(spec, paths), spec, context)
    save_final(model, prepare.load_tokenizer(paths.tokenizer), paths.final)
    if run.hooks is not None and run.hooks.rank != 0:  # a sharded fine-tune: rank 0 writes final/ and measures it
        return result.__dict__
    after = domain_losses(paths.final, lineage_domains(paths.root, own=paths.root), spec.finetune.batch_size)
    before = stage_result(paths, "merge").get("domains_base", {})
    return {**result.__dict__, "domains": after, "domains_base": before}
