"""`Annotated` dependencies of the routes: settings, the store, the caller (from the bearer token) and the job
named in the path, which must be the caller's own (or the caller an admin): another user's job is a 404.

    @router.get("/{job_id}/artifacts")
    def read_artifacts(job: JobDep) -> ArtifactsPublic: ...
    def submit_job(caller: CallerDep, ...): caller.name, caller.is_admin

The bearer token is MOEDISCO_API_TOKEN (the bootstrap admin, `admin`) or a user's token (`service.store.users`),
looked up in the store on every request, so a revoked one is refused at once. The dependencies that do no I/O are
`async def`, because FastAPI runs every plain `def` dependency in its threadpool (a thread hop per dependency per
request); `get_job` reads the store and stays a `def`. `view_response` serves the polled views
(`service.reporting.views`).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Response, status
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.core.config import Settings, is_loopback
from service.reporting.views import JobViews
from service.store.models import BOOTSTRAP_ADMIN, JobRow
from service.store.store import Store
from service.store.users import Users

JOB_ID = re.compile(r"^[0-9a-f]{12}$")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_views(request: Request) -> JobViews:
    return request.app.state.views


async def get_users(request: Request) -> Users:
    return request.app.state.users


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
ViewsDep = Annotated[JobViews, Depends(get_views)]
UsersDep = Annotated[Users, Depends(get_users)]
JobIdPath = Annotated[str, PathParam(description="Job id (12 hex digits).")]

bearer = HTTPBearer(auto_error=False, description="MOEDISCO_API_TOKEN (the admin) or a user's token, sent as "
                                                    "`Authorization: Bearer <token>`.")


@dataclass(frozen=True)
class Caller:
    """Who sent the request: a user's name, or `admin` for MOEDISCO_API_TOKEN."""

    name: str
    is_admin: bool

    @property
    def sees_only(self) -> str | None:
        """The owner whose jobs this caller may see; None: every job (an admin)."""
        return None if self.is_admin else self.name

    def may_see(self, owner: str) -> bool:
        return self.is_admin or owner == self.name


BOOTSTRAP = Caller(BOOTSTRAP_ADMIN, is_admin=True)


def _is_bootstrap_token(settings: Settings, presented: str) -> bool:
    # Compare bytes: compare_digest refuses non-ASCII str, and a header may carry any latin-1 text.
    token = settings.api_token
    return token is not None and secrets.compare_digest(presented.encode(), token.get_secret_value().encode())


async def get_caller(request: Request, settings: SettingsDep, users: UsersDep,
                     credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Caller:
    if credentials is not None:
        if _is_bootstrap_token(settings, credentials.credentials):
            return BOOTSTRAP
        user = users.authenticate(credentials.credentials)  # one primary-key read: cheaper than a thread hop
        if user is not None:
            return Caller(user.name, user.is_admin)
    if settings.api_token is None:
        # No token configured: the service is open, so only this machine may use it (it also binds to loopback,
        # but Ray Serve's proxy may be told to listen elsewhere). An unknown token counts as none: on loopback,
        # anyone is the admin anyway.
        if not is_loopback(request.client.host if request.client else None):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "no MOEDISCO_API_TOKEN configured: loopback clients only")
        return BOOTSTRAP
    raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing, wrong or revoked bearer token",
                        headers={"WWW-Authenticate": "Bearer"})


CallerDep = Annotated[Caller, Depends(get_caller)]


async def require_admin(caller: CallerDep) -> Caller:
    if not caller.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"user {caller.name!r} is not an admin")
    return caller


AdminDep = Annotated[Caller, Depends(require_admin)]


def no_such_job(job_id: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}")


def get_job(job_id: JobIdPath, store: StoreDep, caller: CallerDep) -> JobRow:
    job = store.get_job(job_id) if JOB_ID.match(job_id) else None
    if job is None or not caller.may_see(job.owner):  # someone else's job does not exist for this caller
        raise no_such_job(job_id)
    return job


JobDep = Annotated[JobRow, Depends(get_job)]


async def view_response(if_fresh, build, job_id: str, caller: Caller) -> Response:
    """The JSON of a polled view (`JobViews.job_if_fresh` / `build_job`, or the cost pair); 404 without the job,
    or when it is not the caller's. The version lookup and a current cached body run on the event loop (one
    primary-key read costs the replica less than a thread hop), the store reads of a rebuild in the threadpool."""
    version, body = if_fresh(job_id, caller.sees_only) if JOB_ID.match(job_id) else (None, None)
    if body is None and version is not None:
        body = await run_in_threadpool(build, job_id, version)
    if body is None:
        raise no_such_job(job_id)
    # Built from the response model when it was cached, so FastAPI has nothing left to validate.
    return Response(body, media_type="application/json")
