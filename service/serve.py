"""The Ray Serve deployment that wraps the FastAPI app; `build_app` is the application builder.

    serve run service.serve:build_app                    # or the KubeRay RayService import_path
    serve.run(build_app({"runner": "local", "data_dir": "/tmp/m"}), route_prefix="/")

`args` (a RayService's `args:` block) override the MOEDISCO_* environment, key by key, with Settings' field names
(api_token, database_url, data_dir, runner, max_running_jobs ...). Two more keys place the replica:
`num_cpus` (default 0: the API is light and must not take a CPU from training) and `label_selector`
(e.g. {"moedisco.io/role": "control-plane"} to keep it on the head node, as k8s/rayservice.yaml labels it).

One replica: it also runs the dispatcher, and two dispatchers would race on the same queue. Jobs are detached
actors, so the replica can be restarted or redeployed without touching them; the new one reconciles.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from service.core.config import Settings
from service.main import create_app


@serve.deployment(num_replicas=1, max_ongoing_requests=64)
@serve.ingress()
class MoediscoAPI:
    def __init__(self, settings: dict[str, Any]):
        self.settings = Settings(**settings)

    def __serve_build_asgi_app__(self):
        return create_app(self.settings)


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Ray Serve application builder (import path `service.serve:build_app`)."""
    args = dict(args or {})
    actor_options: dict[str, Any] = {"num_cpus": args.pop("num_cpus", 0)}
    label_selector = args.pop("label_selector", None)
    if label_selector:
        actor_options["label_selector"] = label_selector
    # Validate here, on the driver, so a bad args block fails `serve run` at once rather than in the replica.
    Settings(**args)
    return MoediscoAPI.options(ray_actor_options=actor_options).bind(args)
