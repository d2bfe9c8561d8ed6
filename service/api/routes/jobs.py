"""Jobs: submit, list (filter by state, paginate), read one (stages, per-expert progress, latest losses), cancel.

    POST /v1/jobs                 the job spec as JSON -> 201 JobPublic (422 names each bad field)
    GET  /v1/jobs?state=running&offset=0&limit=20     an admin may add &owner=ada
    GET  /v1/jobs/{id}            JobDetail (from `service.reporting.views`: rebuilt only when the job changed)
    POST /v1/jobs/{id}/cancel     queued: cancelled now; running: stops at the next stage boundary or checkpoint
    POST /v1/jobs/{id}/resume     failed or cancelled: queued again on its output_dir (finished stages are kept)
    GET  /v1/jobs/{id}/experts    the final model's experts and their provenance (`service.api.routes.experts`)

A user sees and touches only their own jobs (another's is a 404); an admin sees everyone's. Submitting or resuming
a job checks its owner's queue limit and monthly budget (`service.api.quotas`).
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, status

from service.api.deps import (
    Caller,
    CallerDep,
    JobDep,
    JobIdPath,
    SettingsDep,
    StoreDep,
    UsersDep,
    ViewsDep,
    view_response,
)
from service.api.quotas import check_monthly_budget, check_queue_limit
from service.api.routes import experts
from service.jobs.access import reader_of
from service.jobs.specs import prepare_spec
from service.schemas import (
    TERMINAL_STATES,
    USER_NAME_PATTERN,
    JobCreate,
    JobDetail,
    JobPublic,
    JobsPublic,
    JobState,
    Message,
)

router = APIRouter(prefix="/jobs", tags=["jobs"])
router.include_router(experts.router)

MAX_PAGE = 100
MAX_OFFSET = 2**31 - 1  # beyond a database integer; no store holds that many jobs
RESUMABLE_STATES = ("failed", "cancelled")


QUOTA_RESPONSES = {403: {"model": Message, "description": "The owner's monthly budget would be exceeded."},
                   429: {"model": Message, "description": "The owner has too many jobs queued."}}


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobPublic, responses=QUOTA_RESPONSES)
def submit_job(job_in: JobCreate, request: Request, response: Response, settings: SettingsDep,
               store: StoreDep, users: UsersDep, caller: CallerDep) -> JobPublic:
    """Queue a job, owned by the caller. Its output_dir is MOEDISCO_DATA_DIR/jobs/<id>/; input paths must exist on
    the server. Refused when the caller has too many jobs queued, or its estimate exceeds their budget left."""
    job_id = uuid.uuid4().hex[:12]
    spec = prepare_spec(job_in, job_id, settings, reader_of(caller.name, caller.is_admin, store))
    check_queue_limit(users, settings, caller)
    estimate = check_monthly_budget(users, caller, spec)
    job = store.create_job(job_id, spec, runner=settings.runner, owner=caller.name)
    if estimate is not None:  # computed already: the runner need not redo it
        store.set_estimate(job_id, estimate)
    _wake_dispatcher(request)
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return JobPublic.model_validate(job)


@router.get("", response_model=JobsPublic)
def list_jobs(store: StoreDep, caller: CallerDep,
              state: Annotated[list[JobState] | None, Query(description="Only jobs in these states.")] = None,
              owner: Annotated[str | None, Query(pattern=USER_NAME_PATTERN, description="Only this user's jobs "
                                                 "(admins; others see only their own).")] = None,
              offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
              limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20) -> JobsPublic:
    """The caller's jobs (an admin's: everyone's), newest first."""
    rows, count = store.list_jobs(state, offset, limit, owner=caller.sees_only or owner)
    return JobsPublic(data=[JobPublic.model_validate(r) for r in rows], count=count, offset=offset, limit=limit)


@router.get("/{job_id}", response_model=JobDetail, responses={404: {"model": Message}})
async def read_job(job_id: JobIdPath, views: ViewsDep, caller: CallerDep) -> Response:
    """State, current stage, and per stage (and expert): state, latest step and losses."""
    return await view_response(views.job_if_fresh, views.build_job, job_id, caller)


@router.post("/{job_id}/cancel", response_model=JobPublic, responses={404: {"model": Message},
                                                                      409: {"model": Message}})
def cancel_job(job: JobDep, store: StoreDep) -> JobPublic:
    """Cancel a job. A running one keeps `state: running` with `cancel_requested: true` until its runner stops."""
    if job.state in TERMINAL_STATES:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job.id} is already {job.state}")
    return JobPublic.model_validate(store.request_cancel(job.id))


@router.post("/{job_id}/resume", response_model=JobPublic, responses={404: {"model": Message},
                                                                      409: {"model": Message}, **QUOTA_RESPONSES})
def resume_job(job: JobDep, request: Request, store: StoreDep, users: UsersDep, settings: SettingsDep) -> JobPublic:
    """Queue a failed or cancelled job again on its output_dir: its runner skips the finished stages and resumes
    an interrupted one from its last checkpoint. The job's owner's queue limit and budget apply."""
    if job.state in RESUMABLE_STATES:  # else the 409 below, whatever the quotas say
        owner = Caller(job.owner, is_admin=False)  # an admin resuming someone's job queues it under their limits
        check_queue_limit(users, settings, owner)
        check_monthly_budget(users, owner, None)
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
