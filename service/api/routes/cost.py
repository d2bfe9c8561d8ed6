"""A job's cost: per stage tier, device type, devices, hours, $/h and $; the total; baseline and savings.

    GET /v1/jobs/{id}/cost     live while the job runs (running stages priced so far, `final: false`)
"""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import JobDep, StoreDep
from service.costs import job_cost
from service.schemas import CostPublic, Message

router = APIRouter(prefix="/jobs", tags=["cost"])


@router.get("/{job_id}/cost", response_model=CostPublic, responses={404: {"model": Message}})
def read_cost(job: JobDep, store: StoreDep) -> CostPublic:
    """Dollars per stage and tier, the full-parameter baseline (measured or estimated) and the savings."""
    return job_cost(store, job)
