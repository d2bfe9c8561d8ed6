"""All routes under /v1 (each requires the bearer token); /healthz and /metrics are added by `service.main`.

    app.include_router(api_router, prefix="/v1")
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.api.deps import require_token
from service.api.routes import artifacts, cost, jobs, metrics, report

api_router = APIRouter(dependencies=[Depends(require_token)],
                       responses={401: {"description": "Missing or wrong bearer token."}})
for module in (jobs, cost, metrics, artifacts, report):
    api_router.include_router(module.router)
