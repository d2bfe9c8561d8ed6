"""A job's training metrics: the records of OUTPUT/metrics.jsonl (losses, tokens, router load ...).

    GET /v1/jobs/{id}/metrics?stage=submodel&expert=1&offset=0&limit=1000

The records are moedisco's own (`moedisco.job.metrics.read_metrics`), made JSON-safe: a NaN loss reads as null,
and a torn last line is skipped, never a 500.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query

from moedisco.job.layout import JobPaths
from moedisco.job.metrics import read_metrics
from service.api.deps import JobDep
from service.schemas import Message, MetricsPublic
from service.store.store import json_safe

router = APIRouter(prefix="/jobs", tags=["metrics"])

MAX_RECORDS = 10_000


def read_records(path: Path) -> list[dict]:
    """moedisco's metrics records, JSON-safe (a torn line is skipped there, never a 500)."""
    return [json_safe(record) for record in read_metrics(path)]


@router.get("/{job_id}/metrics", response_model=MetricsPublic, responses={404: {"model": Message}})
def read_job_metrics(job: JobDep, stage: Annotated[str | None, Query(max_length=64)] = None,
                     expert: Annotated[int | None, Query(ge=0, le=100_000)] = None,
                     offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
                     limit: Annotated[int, Query(ge=1, le=MAX_RECORDS)] = 1000) -> MetricsPublic:
    """Metrics records, oldest first, optionally of one stage and expert."""
    records = [r for r in read_records(JobPaths(job.output_dir).metrics)
               if (stage is None or r.get("stage") == stage) and (expert is None or r.get("expert") == expert)]
    return MetricsPublic(data=records[offset:offset + limit], count=len(records), offset=offset, limit=limit)
