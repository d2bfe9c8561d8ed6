"""The FastAPI application: importable and testable without Ray Serve (which wraps it in `service.serve`).

    app = create_app(Settings(data_dir=tmp, api_token="t"), dispatch=False)   # API only, jobs stay queued
    with TestClient(app) as client: client.get("/healthz")
    uvicorn.run(create_app(), host=..., port=...)                              # API + queue on a Ray cluster

With `dispatch=True` the app's lifespan joins Ray (unless already inside it) and runs the dispatcher thread that
starts queued jobs and resumes jobs whose runner is gone. The two routes clients poll (a job, its cost) answer from
`service.reporting.views`, rebuilt only when the store says the job changed; the dependencies that do no I/O are
`async`, so a request makes at most one thread hop.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry

from service.api.limits import BodyLimit, clip_input
from service.api.router import api_router
from service.api.routes import health
from service.core.config import Settings
from service.jobs.dispatcher import Dispatcher, RayLauncher
from service.reporting.prometheus import StoreCollector
from service.reporting.views import JobViews
from service.store.store import Store, json_safe
from service.store.users import Users

log = logging.getLogger(__name__)

DESCRIPTION = """Train Mixture-of-Experts LMs the MoE-DisCo way and see what they cost.

Every route but `/healthz` needs `Authorization: Bearer <token>`: MOEDISCO_API_TOKEN (the admin, who creates users
and their tokens under `/v1/users`) or a user's token (without a configured MOEDISCO_API_TOKEN the service serves
loopback clients only). A user sees only their own jobs. This page and `/openapi.json` are open: they describe,
they hold no data."""


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    # FastAPI's own handler echoes the whole offending input (the whole body, for a missing field), and a NaN in it
    # would turn the 422 into a 500: echo a short prefix of it at most.
    errors = [{**e, "input": clip_input(e["input"])} if "input" in e else e for e in error.errors()]
    return JSONResponse({"detail": json_safe(jsonable_encoder(errors))},
                        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


def create_app(settings: Settings | None = None, dispatch: bool = True, waker=None) -> FastAPI:
    """`waker`: with dispatch=False, what a submission wakes instead (an object with `wake()`), e.g. the dispatcher
    deployment of `service.serve` when the API has several replicas."""
    settings = settings or Settings()
    store = Store(settings.effective_database_url, billing=settings.billing())
    registry = CollectorRegistry(auto_describe=True)
    registry.register(StoreCollector(store))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        log.warning("moedisco service: %s; data in %s; store %s", settings.startup_notice(), settings.data_dir,
                    store.engine.url.render_as_string(hide_password=True))
        dispatcher = Dispatcher(store, RayLauncher(settings), settings) if dispatch else None
        if dispatcher is not None:
            dispatcher.start()
        app.state.dispatcher = dispatcher or waker
        try:
            yield
        finally:
            if dispatcher is not None:
                dispatcher.stop()
            store.close()

    app = FastAPI(title="moedisco", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings, app.state.store, app.state.registry, app.state.dispatcher = settings, store, registry, None
    app.state.views = JobViews(store, max_age_s=settings.read_cache_max_age_s)
    app.state.users = Users(store)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes,
                       larger={"/v1/files": settings.max_upload_bytes})
    app.include_router(health.router)
    app.include_router(api_router, prefix="/v1")
    return app
