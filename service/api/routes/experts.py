"""A finished model's experts: where each came from, and how an extension or a retirement moved each domain's loss.

    GET /v1/jobs/{id}/experts                       ExpertsPublic; a 404 until the job has its final/ model
    read_experts(Path("runs/extended"), spec)       the same view of a folder here (`moedisco experts --local`)

The provenance is the final model's own record (its config.json, `moedisco.job.provenance`, read as JSON); the
loss per domain of the model's lineage comes from the stage summary that measured it: an extension's fine-tune (or,
before it, its merge), a retirement's retire stage. Only files inside the job's folder are read, resolved as the
artifacts route resolves them; a folder named in the provenance (a base job's) is shown, never opened.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from pydantic import ValidationError

from moedisco.job.layout import JobPaths
from moedisco.job.provenance import expert_provenance_of, loss_changes
from service.api.deps import JobDep
from service.api.routes.artifacts import safe_artifact
from service.schemas import DomainLossPublic, ExpertOriginPublic, ExpertsPublic, Message

router = APIRouter(tags=["experts"])  # under the jobs router (`service.api.routes.jobs`): /jobs/{id}/experts

# The stage summaries that hold an extension's or a retirement's loss per domain, the final model's first.
DOMAIN_STAGES = {"extend": ("finetune", "merge"), "retire": ("retire",)}


def _summary(root: Path, marker: str) -> dict | None:
    """A finished stage's summary, None without one (or a torn one, which the stage's next run writes again)."""
    found = safe_artifact(root, JobPaths(root).marker(marker).relative_to(root).as_posix())
    try:
        return json.loads(found.read_text()) if found is not None else None
    except ValueError:
        return None


def _origin(entry: dict) -> ExpertOriginPublic:
    try:
        return ExpertOriginPublic.model_validate(entry)
    except ValidationError:  # a model folder's own `moedisco_experts` record, not one moedisco wrote
        return ExpertOriginPublic(expert=entry["expert"], origin="unreadable provenance record")


def domain_losses(root: Path, method: str | None) -> tuple[list[DomainLossPublic], str | None]:
    """The loss per domain before and after, and the stage whose summary gave it; nothing for other methods."""
    for stage in DOMAIN_STAGES.get(method, ()):
        summary = _summary(root, stage)
        if summary is None or "domains" not in summary:
            continue
        found = summary["domains"]  # the retire stage's rows, or an extension's {domain: loss after}
        rows = found if isinstance(found, list) else loss_changes(summary.get("domains_base") or {}, found)
        return [DomainLossPublic.model_validate(row) for row in rows], stage
    return [], None


class UnreadableModel(ValueError):
    """The model's config.json is there but is no MoE's config (not JSON, or no expert count)."""


def read_experts(root: Path, spec: dict | None, job_id: str | None = None) -> ExpertsPublic | None:
    """The view of job folder `root` (`spec`: its spec as a dict) or, with `spec` None, of model folder `root`;
    None while there is no model (a job without its final/); `UnreadableModel` for a config.json that is none."""
    config_file = safe_artifact(root, "config.json" if spec is None else "final/config.json")
    if config_file is None:
        return None
    try:  # the JSON alone: the API never loads model code
        config = json.loads(config_file.read_text())
        experts = expert_provenance_of(config if isinstance(config, dict) else {})
    except (OSError, ValueError) as failure:
        raise UnreadableModel(f"{config_file.relative_to(root.resolve())} is no MoE model's config ({failure})") \
            from None
    method = (spec or {}).get("method")
    section = (spec or {}).get(method) if method in DOMAIN_STAGES else None
    domains, stage = domain_losses(root, method) if spec is not None else ([], None)
    retired = (_summary(root, "retire") or {}).get("retired_provenance", []) if method == "retire" else []
    return ExpertsPublic(job_id=job_id, method=method, base=section.get("base") if section else None,
                         experts=[_origin(entry) for entry in experts], retired=[_origin(entry) for entry in retired],
                         domains=domains, domains_stage=stage)


@router.get("/{job_id}/experts", response_model=ExpertsPublic,
            responses={404: {"model": Message}, 409: {"model": Message, "description": "The final model's "
                                                      "config.json cannot be read as an MoE's."}})
def read_job_experts(job: JobDep) -> ExpertsPublic:
    """Each expert of the job's final model (the job, corpus and cluster it was trained on) and, for an extension or
    a retirement, the held-out loss of every domain of its lineage before and after."""
    try:
        view = read_experts(Path(job.output_dir), job.spec, job.id)
    except UnreadableModel as failure:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job.id}: {failure}") from None
    if view is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job.id} has no final model yet")
    return view
