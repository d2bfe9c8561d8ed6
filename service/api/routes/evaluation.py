"""A job's downstream scores (its `evaluate` stage, lm-evaluation-harness), next to its baseline's.

    GET /v1/jobs/{id}/evaluation

A 404 until the evaluate stage has written OUTPUT/evaluation.json (or when the spec has no `evaluate` section); the
measured full-parameter baseline's own scores come along when it ran an evaluation too.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter, HTTPException

from moedisco.job.layout import JobPaths
from service.api.deps import JobDep, StoreDep
from service.schemas import EvaluationPublic, Message

router = APIRouter(prefix="/jobs", tags=["evaluation"])


def read_evaluation(output_dir: str | Path) -> dict | None:
    """OUTPUT/evaluation.json, or None while there is none (written whole by the stage, so never torn)."""
    path = JobPaths(Path(output_dir)).evaluation
    return json.loads(path.read_text()) if path.is_file() else None


@router.get("/{job_id}/evaluation", response_model=EvaluationPublic, responses={404: {"model": Message}})
def read_job_evaluation(job: JobDep, store: StoreDep) -> EvaluationPublic:
    """Scores per model and task; `baseline` holds the measured full-parameter job's own scores when it has any."""
    record = read_evaluation(job.output_dir)
    if record is None:
        detail = ("the job's spec has no `evaluate` section" if not job.spec.get("evaluate")
                  else "the evaluate stage has not finished yet")
        raise HTTPException(status_code=404, detail=f"job {job.id} has no evaluation: {detail}")
    found = store.find_baseline(job)
    baseline = read_evaluation(found[0].output_dir) if found is not None else None
    return EvaluationPublic(job_id=job.id, tasks=record["tasks"], limit=record.get("limit"), models=record["models"],
                            baseline_job_id=found[0].id if baseline is not None else None,
                            baseline=baseline["models"] if baseline is not None else None)
