"""`moedisco serve`: start the API on Ray Serve (default) or on plain uvicorn (`--no-ray-serve`, for debugging).

    moedisco serve                                  # joins the Ray cluster at --address, else starts a local one
    moedisco serve --address auto --port 8000
    moedisco serve --no-ray-serve --runner local    # API and queue in this process; jobs still run as Ray actors

Settings come from MOEDISCO_* variables; the options here override them. Without MOEDISCO_API_TOKEN the service
binds to 127.0.0.1 whatever --host says, and prints that it does.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Annotated

import typer

from moedisco_cli.common import console

if TYPE_CHECKING:  # imported in `serve()`: the other commands never load the service
    from service.core.config import Settings

PROXY_NICENESS_CHECK_S = 30.0


# Set in the environment of the cluster this command starts, so Serve's processes inherit it: requests go from the
# HTTP proxy to the replica over gRPC instead of Ray actor calls, which took the proxy and the replica together 3 ms
# of CPU per request instead of 5 (measured on two cores; the transport of Ray's RAY_SERVE_THROUGHPUT_OPTIMIZED).
# A cluster started elsewhere (--address, KubeRay) needs it in its own nodes' environment.
SERVE_ENV = {"RAY_SERVE_PROXY_USE_GRPC": "1"}


def _connect_ray(settings: Settings, address: str | None) -> bool:
    """Join the cluster at `address`, else start a local one; True when this process started it (and stops it).

    With the Ray runner the local cluster is ray_cluster's simulated one, whose nodes carry the gpu_type labels
    the runner places stages by; the local runner needs no labels."""
    import ray

    if not address:
        for key, value in SERVE_ENV.items():
            os.environ.setdefault(key, value)
    if address:
        from ray_cluster.auth import connect
        from ray_cluster.local_cluster import wants_token

        # A cluster with Ray token authentication wants RAY_AUTH_MODE=token and its token; RayAuthError says so.
        connect(address, token_expected=wants_token(address), namespace=settings.ray_namespace)
        return False
    if settings.runner == "ray":
        from ray_cluster.local_cluster import LocalClusterSpec, start_local_cluster

        cluster_address = start_local_cluster(spec=LocalClusterSpec(autoscale=True))  # nodes come as jobs ask
        if not ray.is_initialized():
            ray.init(address=cluster_address, namespace=settings.ray_namespace)
        return True
    ray.init(address="local", namespace=settings.ray_namespace)  # "local": never join a cluster by accident
    return True


def _stop_local_cluster(settings: Settings) -> None:
    import ray

    if settings.runner == "ray":
        from ray_cluster.local_cluster import stop_local_cluster

        stop_local_cluster()
    ray.shutdown()


def _run_uvicorn(settings: Settings, host: str) -> None:
    import uvicorn

    from service.main import create_app

    uvicorn.run(create_app(settings), host=host, port=settings.port, log_level="info")


def _run_ray_serve(settings: Settings, host: str) -> None:
    from ray import serve

    from service.serve import build_app, prioritise_local_proxies

    # One HTTP proxy, on the head node (as k8s/rayservice.yaml configures it): a proxy per node is a process per
    # node that every request could go through.
    serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": settings.port})
    args = settings.model_dump(mode="json", exclude_none=True)
    if settings.api_token is not None:
        args["api_token"] = settings.api_token.get_secret_value()
    serve.run(build_app(args), name="moedisco-api", route_prefix="/", blocking=False)
    console.print(f"moedisco API on http://{host}:{settings.port} (Ray Serve); Ctrl-C stops it")
    # SIGTERM (docker stop, kill) ends like Ctrl-C, so Serve and a cluster started here are shut down too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:  # the proxies at the API's niceness, again after Serve restarts one
            try:
                prioritise_local_proxies(settings.api_niceness)
            except Exception as error:  # the state API is a nicety here: the API serves without it
                logging.getLogger(__name__).warning("could not set the proxies' niceness: %s", error)
            time.sleep(PROXY_NICENESS_CHECK_S)
    finally:
        serve.shutdown()


def serve(host: Annotated[str | None, typer.Option(help="Address to bind (MOEDISCO_HOST, default 127.0.0.1).")] = None,
          port: Annotated[int | None, typer.Option(help="Port (MOEDISCO_PORT, default 8000).")] = None,
          address: Annotated[str | None, typer.Option(help="Ray cluster to join; unset starts a local one.")] = None,
          runner: Annotated[str | None, typer.Option(help="`ray` or `local` (MOEDISCO_RUNNER, default ray).")] = None,
          ray_serve: Annotated[bool, typer.Option(help="Serve through Ray Serve; --no-ray-serve: uvicorn.")] = True,
          ) -> None:
    """Start the moedisco API (jobs run as detached Ray actors; the store is MOEDISCO_DATABASE_URL)."""
    from service.core.config import Settings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {"host": host, "port": port, "runner": runner, "ray_address": address}
    settings = Settings(**{key: value for key, value in overrides.items() if value is not None})
    try:
        bind = settings.effective_host()
    except ValueError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    console.print(f"[bold]{settings.startup_notice()}[/bold]")
    try:
        started_here = _connect_ray(settings, settings.ray_address)
    except ConnectionError as error:  # the cluster refused us (ray_cluster.auth.RayAuthError says why) or is gone
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from None
    try:
        (_run_ray_serve if ray_serve else _run_uvicorn)(settings, bind)
    except KeyboardInterrupt:
        pass
    finally:
        if started_here:
            _stop_local_cluster(settings)
