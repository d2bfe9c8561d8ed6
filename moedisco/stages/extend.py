"""Extending a finished MoE with experts for a new corpus (`method: extend`), on the paper's cheap/expensive split.

    spec = with_base_model(load_spec("extend.yaml"))    # model and tokenizer: the base's (moedisco.models.experts)
    stage_source(run)     # source/: the base's backbone + one expert per new cluster, copied from the base
    stage_submodel(...)   # (moedisco.stages.branch) each new expert trains on its cluster on the cheap tier
    stage_merge(run)      # merged/: the base's experts + the new ones, router rows from the new clusters' centroids
    stage_finetune(run)   # final/: a brief fine-tune (router only, or all), the base's corpus replayed beside the new

The new corpus is prepared with the base's tokenizer and clustered into `extend.new_experts` clusters. Each new
expert starts as a copy, per layer, of the base expert whose router row is closest to its cluster's mean hidden state
(the expert the base already sends that data to), and its router row is that mean state, scaled to the base's rows.
With `extend.shared: frozen` the backbone stays the base's, so the old domains change only through the router.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from moedisco.config.spec import JobSpec
from moedisco.io.token_shards import MixedSource, SequenceSource, TokenShard
from moedisco.job.layout import JobPaths, stage_result
from moedisco.models.architecture import num_experts_of, parameter_roles, read_config
from moedisco.models.experts import base_model, expert_provenance, layer_of, rewrite_experts
from moedisco.models.weights import WEIGHTS_FILE, SavedWeights
from moedisco.stages import prepare
from moedisco.stages.cluster import ClusterResult, train_source
from moedisco.stages.domains import domain_losses, lineage, lineage_domains
from moedisco.stages.finetune import finetune, save_final
from moedisco.stages.merge import averaging_weights, centroid_router_rows
from moedisco.stages.prepare import eval_sequences
from moedisco.stages.stage_run import StageRun


def new_cluster_samples(spec: JobSpec, paths: JobPaths) -> list[torch.Tensor]:
    return [train_source(spec, paths, k).head(spec.merge.centroid_sequences) for k in range(spec.num_clusters)]


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
    rows, copied = new_expert_rows(base, new_cluster_samples(spec, paths))

    def new_rows(name: str, role: str, tensor: torch.Tensor) -> torch.Tensor:
        return rows[name].to(tensor.dtype) if name in rows else tensor[copied[layer_of(name)]]

    rewrite_experts(base, paths.source, spec.num_clusters, new_rows)
    return {"base": str(base), "base_experts": num_experts_of(read_config(base)), "new_experts": spec.num_clusters,
            "copied_from": {str(layer): experts for layer, experts in copied.items()}}


def base_documents(spec: JobSpec) -> int:
    """Training documents behind the base's shared parameters: the clusters of every job of its lineage. A bare
    model folder counts as much as the new corpus (its corpus is unknown)."""
    jobs = lineage(spec.extend.base)
    return sum(sum(ClusterResult.load(JobPaths(job).clusters).sizes) for job in jobs)


def stage_merge(run: StageRun) -> dict:
    """merged/: the base's experts, then the new ones; shared parameters the base's (`frozen`) or the
    document-weighted mean of the base's and the new submodels' (`merge`)."""
    spec, paths = run.spec, run.paths
    started = time.perf_counter()
    base = base_model(spec.extend.base)
    config = read_config(base)
    sizes = ClusterResult.load(paths.clusters).sizes
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(paths.submodel(k) / WEIGHTS_FILE, framework="pt"))
                   for k in range(spec.num_clusters)]

        def rows(name: str, role: str, tensor: torch.Tensor) -> torch.Tensor:
            return torch.cat([tensor] + [handle.get_tensor(name).to(tensor.dtype) for handle in handles])

        def shared(name: str, tensor: torch.Tensor) -> torch.Tensor:
            weights = averaging_weights([base_documents(spec) or sum(sizes), *sizes], "samples")
            total = tensor.float() * weights[0]
            for handle, weight in zip(handles, weights[1:]):
                total.add_(handle.get_tensor(name).float(), alpha=weight)
            return total.to(tensor.dtype)

        new = [{"job": spec.name, "output_dir": str(paths.remote or paths.root), "data": str(spec.data.train),
                "cluster": k, "method": "extend", "base": str(base)} for k in range(spec.num_clusters)]
        rewrite_experts(base, paths.merged, num_experts_of(config) + spec.num_clusters, rows,
                        shared=None if spec.extend.shared == "frozen" else shared,
                        provenance=expert_provenance(config) + new)
    prepare.load_tokenizer(paths.tokenizer).save_pretrained(paths.merged)
    domains = lineage_domains(paths.root, spec.finetune.batch_size * spec.finetune.eval_batches)
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
    sequences of the base's lineage (each of its jobs an equal part), so that the router keeps routing them."""
    new = train_source(spec, paths)
    jobs = lineage(spec.extend.base)
    fraction = spec.extend.replay_fraction
    if not jobs or fraction == 0:
        return new
    seq_len = spec.data.sequence_length
    old = [SequenceSource(TokenShard.load(JobPaths(job).tokens("train")), seq_len) for job in jobs]
    return MixedSource([new, *old], [1.0 - fraction] + [fraction / len(old)] * len(old))


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
    domains = lineage_domains(paths.root, spec.finetune.batch_size * spec.finetune.eval_batches)
    after = domain_losses(paths.final, domains, spec.finetune.batch_size)
    before = stage_result(paths, "merge").get("domains_base", {})
    return {**result.__dict__, "domains": after, "domains_base": before}
