"""Where each expert of a saved MoE came from, read from its config.json alone (no torch, no transformers).

    expert_provenance_of(json.loads((OUTPUT / "final" / "config.json").read_text()))
    # [{"expert": 0, "job": "tiny", "data": "corpus.jsonl", "cluster": 0, "method": "moe_disco", ...}, ...]
    loss_changes({"tiny/cluster 0": 4.61}, {"tiny/cluster 0": 4.63})   # [{"domain", "before", "after", "change"}]
    ancestry(Path("runs/extended"))      # [(runs/extended, its spec), (runs/tiny, its spec)]: what it was made from

Every model moedisco writes records, under `PROVENANCE_KEY` in its config.json, the job, corpus and cluster of each
expert (`moedisco.stages.merge.cluster_provenance`); extending and retiring experts carry the record along
(`moedisco.models.experts`). The service reads it here, so its API never loads model code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from moedisco.config.architectures import expert_count

PROVENANCE_KEY = "moedisco_experts"


def base_job(base: Path) -> Path:
    """`extend.base` / `retire.base` as given, or the job folder when it names a job's final/ model."""
    return base.parent if base.name == "final" and (base.parent / "spec.yaml").is_file() else base


class AncestryError(ValueError):
    """A job a model was made from cannot be followed: its spec.yaml does not load, or names a relative base."""


def ancestry(folder: Path, may_read: Callable[[Path], bool] | None = None) -> list[tuple[Path, object]]:
    """The job folders a model was made from, newest first, each with its saved spec: `folder` (a job folder, or a
    job's final/) and, through each spec's `extend.base` or `retire.base`, the jobs before it; a bare model folder
    ends it. `may_read(job folder)` is asked before each spec.yaml is read: False raises `PermissionError`. A
    spec.yaml that does not load, or names a relative base, raises `AncestryError`."""
    from moedisco.config.loading import load_saved_spec

    chain: list[tuple[Path, object]] = []
    current: Path | None = base_job(folder)
    while current is not None and current.resolve() not in {job.resolve() for job, _ in chain}:
        if may_read is not None and not may_read(current.resolve()):
            raise PermissionError(f"{current}: not yours to read")
        if not (current / "spec.yaml").is_file():
            break
        try:
            spec = load_saved_spec(current / "spec.yaml")
        except Exception as failure:  # noqa: BLE001 - any malformed file a user may have written
            raise AncestryError(f"{current / 'spec.yaml'} does not load ({type(failure).__name__})") from None
        chain.append((current, spec))
        section = spec.extend if spec.method == "extend" else spec.retire if spec.method == "retire" else None
        if section is not None and not section.base.is_absolute():  # moedisco saves every path absolute
            raise AncestryError(f"{current / 'spec.yaml'} names a relative base ({section.base})")
        current = base_job(section.base) if section is not None else None
    return chain


def expert_provenance_of(config: dict) -> list[dict]:
    """Where each expert of the model whose config.json is `config` came from, as recorded; an expert of a model
    moedisco did not train (or whose record does not match its experts) is `{"expert": k, "origin": "<model_type>
    checkpoint"}`. A ValueError when `config` is no MoE's (no expert count)."""
    model_type = str(config.get("model_type", "unknown"))
    experts = expert_count(config)
    if experts is None or experts < 1:
        raise ValueError(f"no expert count in a {model_type} config")
    recorded = config.get(PROVENANCE_KEY)
    if isinstance(recorded, list) and len(recorded) == experts and all(isinstance(e, dict) for e in recorded):
        return [{**entry, "expert": k} for k, entry in enumerate(recorded)]
    return [{"expert": k, "origin": f"{model_type} checkpoint"} for k in range(experts)]


def loss_changes(before: dict[str, float], after: dict[str, float]) -> list[dict]:
    """Per domain: the loss before, after and the change (after - before; None where one side was not measured)."""
    return [{"domain": name, "before": before.get(name), "after": after.get(name),
             "change": after[name] - before[name] if name in before and name in after else None}
            for name in dict.fromkeys([*before, *after])]
