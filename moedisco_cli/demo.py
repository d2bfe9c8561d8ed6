"""`moedisco demo` (what `make demo` runs): the whole product on one machine, through its real interfaces.

    moedisco demo                          # examples/tiny.yaml on a local simulated heterogeneous Ray cluster
    moedisco demo --spec my.yaml --port 8100 --set submodel.steps=100

1. starts `moedisco serve --runner ray` in a child process, which starts a local simulated cluster (a head, two
   cheap `gpu_type=4090` nodes, one `gpu_type=A100` node) and the API on Ray Serve;
2. submits the spec over REST and follows it with progress bars per stage and expert;
3. prints the cost table, the report's URL and the Ray dashboard's URL;
4. stops the service and the cluster on the way out, Ctrl-C included.

`start_service`, `wait_healthy` and `stop_service` also start the real service for benchmarks/api_load.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer

from moedisco_cli.api_client import ApiClient
from moedisco_cli.common import SetOpt, console, read_spec_file
from moedisco_cli.jobs import cost
from moedisco_cli.progress import follow_job

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 300.0


def start_service(port: int, data_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "MOEDISCO_DATA_DIR": str(data_dir), "MOEDISCO_PORT": str(port), "MOEDISCO_RUNNER": "ray",
           "MOEDISCO_INPUT_ROOTS": json.dumps([str(REPO / "examples"), str(Path.cwd())])}
    env.pop("MOEDISCO_API_TOKEN", None)  # loopback-only demo: no token, the service says so at start
    log = (data_dir / "service.log").open("a")
    # A session of its own: Ctrl-C reaches this process only, which then stops the service in order.
    return subprocess.Popen([sys.executable, "-m", "moedisco_cli.main", "serve", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with console.status("starting the local Ray cluster and the API..."):
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"the service exited with code {server.returncode}; see {log}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
    raise RuntimeError(f"the service did not answer on {url} within {STARTUP_TIMEOUT_S:.0f} s; see {log}")


def stop_service(server: subprocess.Popen) -> None:
    if server.poll() is not None:
        return
    console.print("stopping the service and the local cluster...")
    server.send_signal(signal.SIGINT)  # `moedisco serve` shuts Serve and the cluster it started down on SIGINT
    try:
        server.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def demo(spec: Annotated[Path, typer.Option(help="Job spec to submit.")] = REPO / "examples" / "tiny.yaml",
         set_: SetOpt = None,
         port: Annotated[int, typer.Option(help="Port of the API.")] = 8000,
         data_dir: Annotated[Path, typer.Option(help="Service data folder (jobs, store).")] = Path("runs/demo")) -> None:
    """Start a local simulated cluster and the service, submit a job over REST, follow it, print its cost."""
    from ray_cluster.local_cluster import DASHBOARD_PORT

    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    server = start_service(port, data_dir)
    try:
        wait_healthy(url, server, data_dir / "service.log")
        console.print(f"API {url} (docs {url}/docs), Ray dashboard http://127.0.0.1:{DASHBOARD_PORT}")
        client = ApiClient(url)
        job = client.submit(read_spec_file(spec, set_ or []))
        console.print(f"submitted job [bold]{job['id']}[/bold] from {spec}")
        finished = follow_job(client, job["id"], 2.0, console)
        console.print(f"job {job['id']}: [bold]{finished['state']}[/bold]"
                      + (f" - {finished['reason']}" if finished.get("reason") else ""))
        os.environ["MOEDISCO_API_URL"] = url
        cost(job["id"])
        console.print(f"report:    {url}/v1/jobs/{job['id']}/report")
        console.print(f"artifacts: {url}/v1/jobs/{job['id']}/artifacts  (files in {finished['output_dir']})")
        console.print(f"dashboard: http://127.0.0.1:{DASHBOARD_PORT}")
        if finished["state"] != "succeeded":
            raise typer.Exit(1)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        raise typer.Exit(130) from None
    finally:
        stop_service(server)
