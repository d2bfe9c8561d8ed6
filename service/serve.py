"""The Ray Serve deployments that wrap the FastAPI app; `build_app` is the application builder.

    serve run service.serve:build_app                    # or the KubeRay RayService import_path
    serve.run(build_app({"runner": "local", "data_dir": "/tmp/m"}), route_prefix="/")

`args` (a RayService's `args:` block) override the MOEDISCO_* environment key by key, with Settings' field names
(api_token, database_url, data_dir, runner, max_running_jobs, serve_num_replicas ...), and `num_cpus` and
`label_selector` place the replicas (`build_app`). The queue has one dispatcher (two would race on it): with one API
replica (the default) that replica runs it; with `serve_num_replicas` > 1 it runs in a deployment of its own,
`MoediscoDispatcher`, which the API replicas wake through a handle when a job is submitted. Jobs are detached actors,
so replicas can be restarted or redeployed without touching them; the new dispatcher reconciles.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.schema import LoggingConfig

from ray_cluster.placement import control_plane_selector
from service.core.config import Settings
from service.main import create_app

log = logging.getLogger(__name__)


def set_process_niceness(niceness: int | None) -> bool:
    """Every thread of this process to `niceness` (Linux keeps one per thread); False when not allowed.

    Ray starts every worker process at niceness 15 (RAY_worker_niceness), the same as the training workers, so on a
    node that also trains (a laptop, the local simulated cluster) each request would wait its turn behind them
    (BENCHMARKS.md measures it); the replicas move themselves to `api_niceness` (default 0, an ordinary server's).
    Lowering a niceness needs CAP_SYS_NICE: without it the replica says so and keeps Ray's."""
    if niceness is None:
        return True
    tasks = Path("/proc/self/task")
    threads = [int(tid) for tid in os.listdir(tasks)] if tasks.is_dir() else [0]
    try:
        for tid in threads:
            os.setpriority(os.PRIO_PROCESS, tid, niceness)
    except PermissionError:
        log.warning("the API stays at niceness %d: lowering it to %d needs CAP_SYS_NICE", os.getpriority(
            os.PRIO_PROCESS, 0), niceness)
        return False
    except ProcessLookupError:  # a thread ended while we went through them
        pass
    return True


def prioritise_local_proxies(niceness: int | None) -> int:
    """Move this machine's Serve HTTP proxies to `niceness` too (they are Ray workers at 15 like the replicas, and
    every request passes through one); for `moedisco serve`, which owns them. Returns how many it moved."""
    import ray
    from ray.util.state import list_actors

    if niceness is None:
        return 0
    proxies = list_actors(address=ray.get_runtime_context().gcs_address, limit=1000, raise_on_missing_output=False,
                          filters=[("class_name", "=", "ProxyActor"), ("state", "=", "ALIVE")])
    moved = 0
    for proxy in proxies:
        try:  # a proxy on another machine has a pid that means nothing here, or another process's
            if not Path(f"/proc/{proxy.pid}/cmdline").read_bytes().startswith(b"ray::ProxyActor"):
                continue
            threads = [int(tid) for tid in os.listdir(f"/proc/{proxy.pid}/task")]
            for tid in threads:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
        except (OSError, ValueError):  # gone, not ours to change, or no CAP_SYS_NICE
            continue
        moved += 1
    return moved


class _RemoteWake:
    """`dispatcher.wake()` for the API app, when the dispatcher is another deployment."""

    def __init__(self, handle):
        self.handle = handle

    def wake(self) -> None:
        self.handle.wake.remote()  # fire and forget: the dispatcher also runs a pass every dispatch_interval_s


@serve.ingress()
class MoediscoAPI:
    def __init__(self, settings: dict[str, Any], dispatcher=None):
        self.settings = Settings(**settings)
        self.dispatcher = dispatcher
        set_process_niceness(self.settings.api_niceness)

    def __serve_build_asgi_app__(self):
        if self.dispatcher is None:
            return create_app(self.settings)
        return create_app(self.settings, dispatch=False, waker=_RemoteWake(self.dispatcher))


class MoediscoDispatcher:
    """The queue and the reconciler in a replica of their own, when the API has several replicas."""

    def __init__(self, settings: dict[str, Any]):
        from service.jobs.dispatcher import Dispatcher, RayLauncher
        from service.store.store import Store

        resolved = Settings(**settings)
        set_process_niceness(resolved.api_niceness)
        self.store = Store(resolved.effective_database_url, billing=resolved.billing())
        self.dispatcher = Dispatcher(self.store, RayLauncher(resolved), resolved)
        self.dispatcher.start()

    def wake(self) -> None:
        self.dispatcher.wake()

    def __del__(self):
        self.dispatcher.stop()
        self.store.close()


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Ray Serve application builder (import path `service.serve:build_app`). Besides Settings' fields, `args` may
    hold `num_cpus` (default 0: the API is light and must not take a CPU from training) and `label_selector`
    (default: the head's {"moedisco.io/role": "control-plane"} when a node carries it, as k8s/ and the local cluster
    label the head, so a replica never keeps a GPU pod alive nor goes with one)."""
    args = dict(args or {})
    actor_options: dict[str, Any] = {"num_cpus": args.pop("num_cpus", 0)}
    label_selector = args.pop("label_selector", None) or control_plane_selector()
    if label_selector:
        actor_options["label_selector"] = label_selector
    # Validate here, on the driver, so a bad args block fails `serve run` at once rather than in the replica.
    settings = Settings(**args)
    options = {"ray_actor_options": actor_options, "max_ongoing_requests": settings.serve_max_ongoing_requests,
               "logging_config": LoggingConfig(enable_access_log=settings.serve_access_log)}
    api = serve.deployment(MoediscoAPI, name="MoediscoAPI", num_replicas=settings.serve_num_replicas, **options)
    if settings.serve_num_replicas == 1:
        return api.bind(args)
    dispatcher = serve.deployment(MoediscoDispatcher, name="MoediscoDispatcher", num_replicas=1, **options)
    return api.bind(args, dispatcher.bind(args))
