"""Liveness and Prometheus metrics.

    GET /healthz    no auth: {"status": "ok"} when the store answers, else 503
    GET /metrics    Prometheus text: jobs by owner and state, stage durations, dollars by owner and tier (admins)

Both sit outside /v1: /healthz is the only route without auth, and /metrics is for admins only because it names
every user and what they spent (`service.reporting.prometheus` reads it from the store at scrape time).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from service.api.deps import StoreDep, require_admin

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(store: StoreDep, response: Response) -> dict[str, str]:
    """Whether the service and its store answer; the only route without auth."""
    try:
        with store.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as error:  # any database failure means "not healthy", never a 500
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return {"status": "unavailable", "database": type(error).__name__}
    return {"status": "ok", "database": "ok"}


@router.get("/metrics", dependencies=[Depends(require_admin)], response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, 403: {"description": "Not an admin."}})
def prometheus_metrics(request: Request) -> Response:
    """Prometheus exposition format, computed from the store at scrape time. Admins only: it names every user
    and what they spent."""
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
