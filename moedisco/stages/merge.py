"""Reintegration: E trained submodels become one MoE (paper sec. 3.1.3, eq. 2).

    merge_submodels(OUTPUT / "source", [OUTPUT / "submodels/0/model.safetensors", ...], weights=[0.3, 0.2, ...],
                    router_init="concat", out=OUTPUT / "merged")
    summary = stage_merge(run)     # the stage: merge, router rows, held-out losses of the merged model

Experts are concatenated along the expert axis; shared parameters are the weighted mean of the submodels' copies
(WP-SGD weights gamma_k = n_k / sum n, or uniform), or with `fisher` the element-wise Fisher-weighted mean, so an
element a submodel's loss was not sensitive to does not dilute the copies that learned something. Router rows come
from the submodels (`concat`, the paper's), a fresh initialisation (`random`) or each cluster's mean hidden state
(`centroid`, patched in afterwards: `moedisco.stages.router_rows`). The merge reads one tensor of one submodel at
a time and writes files as it goes, so its peak memory is about one output file plus the largest tensor, not E
submodels.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
from safetensors import safe_open

from moedisco.config.spec import JobSpec
from moedisco.job.layout import JobPaths
from moedisco.models.architecture import Role, expert_axes, join_experts, read_config
from moedisco.models.experts import record_provenance
from moedisco.models.layerwise import output_head, stream_layers
from moedisco.models.routing import force_experts
from moedisco.models.weights import WEIGHTS_FILE, SavedWeights, WeightsWriter
from moedisco.stages import cluster, prepare
from moedisco.stages.branch import branch_point
from moedisco.stages.cluster import cluster_eval_sequences, train_source
from moedisco.stages.prepare import eval_sequences
from moedisco.stages.router_rows import centroid_router_rows, grouped_rows, patch_tensors
from moedisco.stages.stage_run import StageRun
from moedisco.training.balance import BIAS
from moedisco.training.checkpoint import SECOND_MOMENT_FILE
from moedisco.training.heldout import hidden_loss_sum

FISHER_FLOOR = 1e-30
FISHER_BLOCK_BYTES = 1 << 23  # 8 MB


def averaging_weights(cluster_sizes: Sequence[int], weighting: str) -> list[float]:
    """gamma_k of eq. 2: sample-count weights (WP-SGD) or uniform."""
    if any(size <= 0 for size in cluster_sizes):
        raise ValueError(f"every cluster needs documents, got sizes {list(cluster_sizes)}")
    if weighting == "uniform":
        return [1.0 / len(cluster_sizes)] * len(cluster_sizes)
    total = float(sum(cluster_sizes))
    return [size / total for size in cluster_sizes]


def _weighted_sum(name: str, handles: list, weights: Sequence[float]) -> torch.Tensor:
    """sum_k weights[k] * tensor_k, accumulated in fp32 one submodel at a time: only the running sum and one copy
    are ever in memory."""
    total = None
    for handle, weight in zip(handles, weights):
        tensor = handle.get_tensor(name)
        total = tensor.float() * weight if total is None else total.add_(tensor.float(), alpha=weight)
    return total.to(tensor.dtype)


def _fisher_sum(name: str, handles: list, fisher_handles: list, weights: Sequence[float]) -> torch.Tensor:
    """sum_k gamma_k F_k theta_k / sum_k gamma_k F_k element-wise (Fisher-weighted averaging, Matena & Raffel 2022).

    FISHER_FLOOR is far below any squared gradient a trained element sees, so it only matters where no submodel's
    loss was sensitive (e.g. the embedding row of a token no cluster contains): there the result is the plain
    gamma-weighted mean. Computed a block of rows at a time (FISHER_BLOCK_BYTES of fp32 per temporary), so its
    fp32 numerator, denominator and copies never hold more than a block next to the result.
    """
    shape = handles[0].get_slice(name).get_shape()
    if not shape:
        return _fisher_rows(name, handles, fisher_handles, weights, ())
    rows_per_block = max(1, FISHER_BLOCK_BYTES // (4 * math.prod(shape[1:])))
    merged = None
    for start in range(0, shape[0], rows_per_block):
        rows = slice(start, start + rows_per_block)
        block = _fisher_rows(name, handles, fisher_handles, weights, rows)
        merged = torch.empty(shape, dtype=block.dtype) if merged is None else merged
        merged[rows] = block
    return merged


def _fisher_rows(name: str, handles: list, fisher_handles: list, weights: Sequence[float], rows) -> torch.Tensor:
    numerator = denominator = None
    for handle, fisher_handle, gamma in zip(handles, fisher_handles, weights):
        tensor = handle.get_slice(name)[rows]
        f_gamma = fisher_handle.get_slice(name)[rows].float().add_(FISHER_FLOOR).mul_(gamma)
        if numerator is None:
            numerator, denominator = tensor.float() * f_gamma, f_gamma
        else:
            numerator.addcmul_(tensor.float(), f_gamma)
            denominator.add_(f_gamma)
    return numerator.div_(denominator).to(tensor.dtype)


def shared_average(name: str, handles: list, weights: Sequence[float], fisher_handles: list | None) -> torch.Tensor:
    if fisher_handles is not None:
        return _fisher_sum(name, handles, fisher_handles, weights)
    return _weighted_sum(name, handles, weights)


def _open_all(stack: ExitStack, submodels: Sequence[Path], weights: Sequence[float],
              fisher: Sequence[Path] | None) -> tuple[list, Callable[[str], list | None]]:
    """Open every submodel file (and Fisher file); returns the handles and, per tensor name, the Fisher handles to
    weight it with (None: plain weights)."""
    if len(submodels) != len(weights):
        raise ValueError(f"{len(submodels)} submodels but {len(weights)} weights")
    if fisher is not None and len(fisher) != len(submodels):
        raise ValueError(f"{len(submodels)} submodels but {len(fisher)} Fisher files")
    handles = [stack.enter_context(safe_open(path, framework="pt")) for path in submodels]
    fisher_handles = None if fisher is None else [stack.enter_context(safe_open(path, framework="pt"))
                                                  for path in fisher]
    # Parameters frozen while branching have no second moment; their copies are all equal anyway.
    with_fisher = set(fisher_handles[0].keys()) if fisher_handles else set()
    return handles, lambda name: fisher_handles if name in with_fisher else None


def average_shared(roles: dict[str, Role], submodels: Sequence[Path], weights: Sequence[float],
                   fisher: Sequence[Path] | None = None) -> dict[str, torch.Tensor]:
    """The merge's average of every shared tensor the submodel files hold, as one state dict (the backbone)."""
    with ExitStack() as stack:
        handles, fisher_for = _open_all(stack, submodels, weights, fisher)
        stored = set(handles[0].keys())
        return {name: shared_average(name, handles, weights, fisher_for(name))
                for name, role in roles.items() if role == "shared" and name in stored}


def _merged_tensor(name: str, axes: tuple[int, ...], handles: list, weights: Sequence[float], router_init: str,
                   init_std: float, generator: torch.Generator, fisher_handles: list | None,
                   source: SavedWeights) -> torch.Tensor:
    """Shared: the (Fisher-)weighted average. Per expert: the submodels' slices joined; a router layer mixing
    experts keeps the branch point's entries between groups, which no submodel trained, and each group's expert
    bias (`moedisco.training.balance`) keeps its branch-point mean, so that no group is favoured by how far its
    own drifted."""
    if not axes:
        return shared_average(name, handles, weights, fisher_handles)
    if ".experts." not in name and router_init == "random":  # gate weights drawn, biases and noise scales zero
        fresh = name.endswith(".weight") and "noise" not in name
        shape = source.get(name).shape
        return torch.randn(shape, generator=generator) * init_std if fresh else torch.zeros(shape)
    parts = [handle.get_tensor(name) for handle in handles]
    if name.endswith(BIAS):  # each group's expert bias drifted on its own: only its ranking within the group counts
        parts = _undrifted(parts, source.get(name))
    return join_experts(parts, axes, source.get(name) if len(axes) > 1 else None)


def _undrifted(parts: list[torch.Tensor], branched: torch.Tensor) -> list[torch.Tensor]:
    """Each group's trained expert bias shifted back to the mean it had at the branch point: its experts' ranking
    among themselves is what its submodel learnt; a level common to the group is only how its updates drifted."""
    out, first = [], 0
    for part in parts:
        shift = part.float().mean() - branched[first : first + len(part)].float().mean()
        out.append(part if shift == 0 else (part.float() - shift).to(part.dtype))
        first += len(part)
    return out


def merge_submodels(source: Path, submodels: Sequence[Path], weights: Sequence[float], router_init: str,
                    out: Path, seed: int = 0, max_file_bytes: int = 1 << 30,
                    fisher: Sequence[Path] | None = None) -> Path:
    """Write the merged MoE to `out` (config.json + safetensors) and return `out`. Submodel k's experts (one, or a
    group) and router rows go back where `split.load_submodel` took them from.

    `fisher`, when given, holds each submodel's diagonal Fisher estimate (`optimizer.second_moments`): shared
    parameters are then Fisher-weighted averages, each element scaled by gamma_k F_k.
    """
    config = read_config(source)
    axes = expert_axes(config)
    generator = torch.Generator().manual_seed(seed)
    with ExitStack() as stack, SavedWeights(source) as source_weights:
        handles, fisher_for = _open_all(stack, submodels, weights, fisher)
        out.mkdir(parents=True, exist_ok=True)
        writer = WeightsWriter(out, max_file_bytes)
        stored = set(handles[0].keys())
        for name, tensor_axes in axes.items():
            if name in stored:  # a tied lm_head is stored once, as the embedding
                writer.add(name, _merged_tensor(name, tensor_axes, handles, list(weights), router_init,
                                                config.initializer_range, generator, fisher_for(name),
                                                source_weights))
    writer.close()
    config.save_pretrained(out)
    return out


@torch.no_grad()
def merged_losses(folder: Path, eval_NL: torch.Tensor, cluster_eval: Sequence[torch.Tensor], batch_size: int,
                  num_batches: int, group: int = 1) -> tuple[float, float | None]:
    """`evaluate.evaluate_loss` and `evaluate.oracle_loss` of the model saved in `folder`, in one pass over its
    decoder layers (`group_losses`): the held-out batches, and each cluster's with its tokens forced to that
    cluster's expert (its group of `group` experts)."""
    used = batch_size * num_batches
    clusters = [(k, seqs_NL[:used]) for k, seqs_NL in enumerate(cluster_eval) if len(seqs_NL)]
    losses = group_losses(folder, [eval_NL[:used]] + [seqs_NL for _, seqs_NL in clusters], batch_size,
                          forced=[None] + [range(k * group, (k + 1) * group) for k, _ in clusters])
    counts = [len(seqs_NL) for _, seqs_NL in clusters]
    oracle = sum(loss * n for loss, n in zip(losses[1:], counts)) / sum(counts) if counts else None
    return losses[0], oracle


@torch.no_grad()
def group_losses(folder: Path, groups: Sequence[torch.Tensor], batch_size: int,
                 forced: Sequence[Sequence[int] | None] | None = None) -> list[float]:
    """Mean next-token loss of each group of sequences under the model saved in `folder`, in one pass over its
    decoder layers (`moedisco.models.layerwise`), so the whole MoE is never in memory. `forced[g]`, when set,
    routes every token of group g among those experts alone (`force_experts`: the oracle routing)."""
    if not groups:
        return []
    forced = list(forced) if forced is not None else [None] * len(groups)
    with SavedWeights(folder) as weights:
        hidden = stream_layers(weights, groups, batch_size, lambda index, layer: lambda group: (
            nullcontext() if forced[group] is None else force_experts(layer, forced[group], weights.config)))
        head = output_head(weights)
        return [_mean_loss(hidden_NLH, group_NL, head, batch_size) for hidden_NLH, group_NL in zip(hidden, groups)]


def _mean_loss(hidden_NLH: torch.Tensor, seqs_NL: torch.Tensor, head: torch.nn.Linear, batch_size: int) -> float:
    total = sum(hidden_loss_sum(hidden_NLH[start : start + batch_size], seqs_NL[start : start + batch_size], head)
                for start in range(0, len(seqs_NL), batch_size))
    return total / max(1, seqs_NL[:, 1:].numel())


def cluster_samples(spec: JobSpec, paths: JobPaths) -> list[torch.Tensor]:
    """The first `merge.centroid_sequences` training sequences of each cluster: what centroid router rows are
    estimated from."""
    return [train_source(spec, paths, k).head(spec.merge.centroid_sequences) for k in range(spec.num_clusters)]


def cluster_provenance(spec: JobSpec, paths: JobPaths) -> list[dict]:
    """The provenance of the experts this job trained, one per expert (`moedisco.models.experts`): the job, its
    corpus, the cluster and how the clusters were found (with `cluster.method: field`, the domain). Every expert of
    a group (`model.experts_per_submodel`) was trained on its submodel's cluster."""
    domains = cluster.ClusterResult.load(paths.clusters).domains
    group = spec.model.experts_per_submodel
    return [{"job": spec.name, "output_dir": str(paths.remote or paths.root), "data": str(spec.data.train),
             "cluster": k, "method": spec.method, "clustering": spec.cluster.method,
             **({"domain": domains[k]} if domains else {})} for k in range(spec.num_clusters) for _ in range(group)]


def shared_weighting(spec: JobSpec, paths: JobPaths) -> tuple[list[float], bool]:
    """gamma_k of the shared-parameter average (merge and sync alike), and whether it is Fisher-weighted."""
    sizes = cluster.ClusterResult.load(paths.clusters).sizes
    fisher = spec.merge.weighting == "fisher"
    return averaging_weights(sizes, "samples" if fisher else spec.merge.weighting), fisher



def stage_merge(run: StageRun) -> dict:
    spec, paths = run.spec, run.paths
    started = time.perf_counter()
    weights, fisher = shared_weighting(spec, paths)
    files = [paths.submodel(k) / WEIGHTS_FILE for k in range(spec.num_clusters)]
    moments = [paths.submodel(k) / SECOND_MOMENT_FILE for k in range(spec.num_clusters)] if fisher else None
    missing = [str(path) for path in moments or [] if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"merge.weighting is 'fisher' but {', '.join(missing)} do not exist: submodels "
                                "save their second moments only when trained with that setting; re-run them")
    merge_submodels(branch_point(spec, paths), files, weights, spec.merge.router_init, paths.merged,
                          seed=spec.seed, fisher=moments)
    if spec.merge.router_init == "centroid":  # one decoder layer at a time, then only the router bytes rewritten
        rows = centroid_router_rows(paths.merged, cluster_samples(spec, paths))
        patch_tensors(paths.merged, grouped_rows(rows, paths.merged) if spec.model.experts_per_submodel > 1 else rows)
    record_provenance(paths.merged, cluster_provenance(spec, paths))
    prepare.load_tokenizer(paths.tokenizer).save_pretrained(paths.merged)
    cfg = spec.finetune  # evaluated one decoder layer at a time too: the merge never holds the whole MoE
    eval_loss, oracle = merged_losses(paths.merged, eval_sequences(spec, paths), cluster_eval_sequences(spec, paths),
                                      cfg.batch_size, cfg.eval_batches, spec.model.experts_per_submodel)
    seconds = time.perf_counter() - started
    run.metrics.write({"stage": "merge", "step": 0, "eval_loss": eval_loss, "oracle_eval_loss": oracle,
                       "weights": weights, "seconds": seconds, "device": "cpu"})
    return {"weights": weights, "eval_loss": eval_loss, "oracle_eval_loss": oracle, "seconds": seconds}
