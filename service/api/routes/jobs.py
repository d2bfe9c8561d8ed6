"""Jobs: submit, list (filter by state, paginate), read one (stages, per-expert progress, latest losses), cancel.

    POST /v1/jobs                 the job spec as JSON -> 201 JobPublic (422 names each bad field)
    GET  /v1/jobs?state=running&offset=0&limit=20
    GET  /v1/jobs/{id}            JobDetail (from `service.views`: rebuilt only when the job changed)
    POST /v1/jobs/{id}/cancel     queued: cancelled now; running: stops at the next stage boundary or checkpoint
    POST /v1/jobs/{id}/resume     failed or cancelled: queued again on its output_dir (finished stages are kept)
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, status

from service.api.deps import JobDep, JobIdPath, SettingsDep, StoreDep, ViewsDep, view_response
from service.schemas import TERMINAL_STATES, JobCreate, JobDetail, JobPublic, JobsPublic, JobState, Message
from service.specs import prepare_spec

router = APIRouter(prefix="/jobs", tags=["jobs"])

MAX_PAGE = 100
MAX_OFFSET = 2**31 - 1  # beyond a database integer; no store holds that many jobs


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobPublic)
def submit_job(job_in: JobCreate, request: Request, response: Response, settings: SettingsDep,
               store: StoreDep) -> JobPublic:
    """Queue a job. Its output_dir is MOEDISCO_DATA_DIR/jobs/<id>/; input paths must exist on the server."""
    job_id = uuid.uuid4().hex[:12]
    spec = prepare_spec(job_in, job_id, settings)
    job = store.create_job(job_id, spec, runner=settings.runner)
    _wake_dispatcher(request)
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return JobPublic.model_validate(job)


@router.get("", response_model=JobsPublic)
def list_jobs(store: StoreDep,
              state: Annotated[list[JobState] | None, Query(description="Only jobs in these states.")] = None,
              offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
              limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20) -> JobsPublic:
    """Jobs, newest first."""
    rows, count = store.list_jobs(state, offset, limit)
    return JobsPublic(data=[JobPublic.model_validate(r) for r in rows], count=count, offset=offset, limit=limit)


@router.get("/{job_id}", response_model=JobDetail, responses={404: {"model": Message}})
async def read_job(job_id: JobIdPath, views: ViewsDep) -> Response:
    """State, current stage, and per stage (and expert): state, latest step and losses."""
    return await view_response(views.job_if_fresh, views.build_job, job_id)


@router.post("/{job_id}/cancel", response_model=JobPublic, responses={404: {"model": Message},
                                                                      409: {"model": Message}})
def cancel_job(job: JobDep, store: StoreDep) -> JobPublic:
    """Cancel a job. A running one keeps `state: running` with `cancel_requested: true` until its runner stops."""
    if job.state in TERMINAL_STATES:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job.id} is already {job.state}")
    return JobPublic.model_validate(store.request_cancel(job.id))


@router.post("/{job_id}/resume", response_model=JobPublic, responses={404: {"model": Message},
                                                                      409: {"model": Message}})
def resume_job(job: JobDep, request: Request, store: StoreDep) -> JobPublic:
    """Queue a failed or cancelled job again on its output_dir: its runner skips the finished stages and resumes
    an interrupted one from its last checkpoint."""
    if not store.resume_job(job.id):
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job.id} is {job.state}: only a failed or cancelled "
                                                      "job can be resumed")
    _wake_dispatcher(request)
    return JobPublic.model_validate(store.get_job(job.id))


def _wake_dispatcher(request: Request) -> None:
    """Start a queued job now rather than at the dispatcher's next pass (none runs in tests of the bare app)."""
    dispatcher = getattr(request.app.state, "dispatcher", None)
    if dispatcher is not None:
        dispatcher.wake()
