"""`Annotated` dependencies of the routes: settings, the store, the bearer token and the job named in the path.

    @router.get("/{job_id}/artifacts")
    def read_artifacts(job: JobDep) -> ArtifactsPublic: ...

The dependencies that do no I/O are `async def`: FastAPI runs every plain `def` dependency in its threadpool, a
thread hop per dependency per request. `get_job` reads the store and stays a `def`.

`view_response` serves the polled views of `service.views`: the version lookup and a current cached body on the
event loop (one primary-key read costs the replica less than a thread hop), the store reads of a rebuild in the
threadpool.
"""

from __future__ import annotations

import re
import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Response, status
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.core.config import Settings, is_loopback
from service.models import JobRow
from service.store import Store
from service.views import JobViews

JOB_ID = re.compile(r"^[0-9a-f]{12}$")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_views(request: Request) -> JobViews:
    return request.app.state.views


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
ViewsDep = Annotated[JobViews, Depends(get_views)]
JobIdPath = Annotated[str, PathParam(description="Job id (12 hex digits).")]

bearer = HTTPBearer(auto_error=False, description="MOEDISCO_API_TOKEN, sent as `Authorization: Bearer <token>`.")


async def require_token(request: Request, settings: SettingsDep,
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    token = settings.api_token
    if token is None:
        # No token configured: the service is open, so only this machine may use it (it also binds to loopback,
        # but Ray Serve's proxy may be told to listen elsewhere).
        if not is_loopback(request.client.host if request.client else None):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "no MOEDISCO_API_TOKEN configured: loopback clients only")
        return
    # Compare bytes: compare_digest refuses non-ASCII str, and a header may carry any latin-1 text.
    if credentials is None or not secrets.compare_digest(credentials.credentials.encode(),
                                                         token.get_secret_value().encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong bearer token",
                            headers={"WWW-Authenticate": "Bearer"})


def no_such_job(job_id: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}")


def get_job(job_id: JobIdPath, store: StoreDep) -> JobRow:
    job = store.get_job(job_id) if JOB_ID.match(job_id) else None
    if job is None:
        raise no_such_job(job_id)
    return job


JobDep = Annotated[JobRow, Depends(get_job)]


async def view_response(if_fresh, build, job_id: str) -> Response:
    """The JSON of a polled view (`JobViews.job_if_fresh` / `build_job`, or the cost pair); 404 without the job."""
    version, body = if_fresh(job_id) if JOB_ID.match(job_id) else (None, None)
    if body is None and version is not None:
        body = await run_in_threadpool(build, job_id, version)
    if body is None:
        raise no_such_job(job_id)
    # Built from the response model when it was cached, so FastAPI has nothing left to validate.
    return Response(body, media_type="application/json")
