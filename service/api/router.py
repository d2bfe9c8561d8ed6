"""All routes under /v1 (each requires a bearer token); /healthz and /metrics are added by `service.main`.

    app.include_router(api_router, prefix="/v1")

Each resource has its own router in `service.api.routes`; this one puts the bearer-token check (`deps.get_caller`)
in front of all of them, so a /v1 route cannot be left open by forgetting it.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.api.deps import get_caller
from service.api.routes import artifacts, cluster, cost, evaluation, files, jobs, metrics, report, users

api_router = APIRouter(dependencies=[Depends(get_caller)],
                       responses={401: {"description": "Missing, wrong or revoked bearer token."}})
for module in (jobs, cost, metrics, evaluation, artifacts, report, files, users, cluster):
    api_router.include_router(module.router)
