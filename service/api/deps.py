"""`Annotated` dependencies of the routes: settings, the store, the bearer token and the job named in the path.

    @router.get("/{job_id}")
    def read_job(job: JobDep, store: StoreDep) -> JobDetail: ...
"""

from __future__ import annotations

import re
import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi import Path as PathParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.core.config import Settings, is_loopback
from service.models import JobRow
from service.store import Store

JOB_ID = re.compile(r"^[0-9a-f]{12}$")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]

bearer = HTTPBearer(auto_error=False, description="MOEDISCO_API_TOKEN, sent as `Authorization: Bearer <token>`.")


def require_token(request: Request, settings: SettingsDep,
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


def get_job(job_id: Annotated[str, PathParam(description="Job id (12 hex digits).")], store: StoreDep) -> JobRow:
    job = store.get_job(job_id) if JOB_ID.match(job_id) else None
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}")
    return job


JobDep = Annotated[JobRow, Depends(get_job)]
