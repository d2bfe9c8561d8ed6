"""A job's cost: per stage tier, device type, devices, hours, $/h and $; the total; baseline and savings.

    GET /v1/jobs/{id}/cost     live while the job runs (running stages priced so far, `final: false`)

The view comes from `service.reporting.views`: its store reads are redone only when the job (or a possible
baseline) changed.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.deps import CallerDep, JobIdPath, ViewsDep, view_response
from service.schemas import CostPublic, Message

router = APIRouter(prefix="/jobs", tags=["cost"])


@router.get("/{job_id}/cost", response_model=CostPublic, responses={404: {"model": Message}})
async def read_cost(job_id: JobIdPath, views: ViewsDep, caller: CallerDep) -> Response:
    """Dollars per stage and tier, the full-parameter baseline (measured or estimated) and the savings."""
    return await view_response(views.cost_if_fresh, views.build_cost, job_id, caller)
