"""Control-plane latency under load, and time from submission to the first submodel training step.

    python benchmarks/api_load.py [--quick] [--clients 50] [--seconds 20]

Starts the real service (`moedisco serve --runner ray`: Ray Serve on a local simulated cluster) on loopback,
submits examples/tiny.yaml, records the seconds from `POST /v1/jobs` until the job reports its first submodel
training record (the loop's step-0 evaluation, logged right before step 1), then runs `--clients` concurrent
clients for `--seconds` alternating `GET /v1/jobs/{id}` and `GET /v1/jobs/{id}/cost`. Targets: p99 < 50 ms;
< 10 s to the first submodel step. Only 127.0.0.1 is contacted; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from _common import REPO

from service.cli import read_spec_file
from service.demo import _start_service, _stop_service, _wait_healthy

MAX_REQUESTS = 200_000


def seconds_to_first_submodel_step(url: str, job_id: str, submitted: float, timeout_s: float = 600.0) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        if any(s["stage"] == "submodel" and s.get("step") is not None for s in job.get("stages", [])):
            return time.monotonic() - submitted
        if job["state"] in ("failed", "cancelled"):
            raise RuntimeError(f"job {job_id} {job['state']}: {job.get('reason')}")
        time.sleep(0.2)
    raise TimeoutError(f"no submodel step within {timeout_s} s")


async def _client(http: httpx.AsyncClient, paths: list[str], until: float, latencies: dict, budget: list[int]):
    turn = 0
    while time.monotonic() < until and budget[0] > 0:
        budget[0] -= 1
        path = paths[turn % len(paths)]
        started = time.perf_counter()
        response = await http.get(path)
        latencies[path].append(time.perf_counter() - started)
        if response.status_code != 200:
            latencies["errors"].append(response.status_code)
        turn += 1


async def load(url: str, job_id: str, clients: int, seconds: float) -> dict:
    paths = [f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/cost"]
    latencies: dict[str, list] = {path: [] for path in paths} | {"errors": []}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as http:
        until, budget = time.monotonic() + seconds, [MAX_REQUESTS]
        await asyncio.gather(*(_client(http, paths, until, latencies, budget) for _ in range(clients)))
    summary = {}
    for path in paths:
        ms = sorted(1000 * x for x in latencies[path])
        summary[path.replace(job_id, "{id}")] = {
            "requests": len(ms), "p50_ms": statistics.median(ms), "p99_ms": ms[int(0.99 * (len(ms) - 1))],
            "max_ms": ms[-1]}
    summary["errors"] = len(latencies["errors"])
    summary["requests_per_s"] = sum(len(latencies[p]) for p in paths) / seconds
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--quick", action="store_true", help="10 s of load.")
    args = parser.parse_args(argv)
    seconds = 10.0 if args.quick else args.seconds
    url = f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory() as tmp:
        server = _start_service(args.port, Path(tmp))
        try:
            _wait_healthy(url, server, Path(tmp) / "service.log")
            submitted = time.monotonic()
            job = httpx.post(f"{url}/v1/jobs", json=read_spec_file(REPO / "examples" / "tiny.yaml", []),
                             timeout=30).json()
            first_step = seconds_to_first_submodel_step(url, job["id"], submitted)
            latency = asyncio.run(load(url, job["id"], args.clients, seconds))
        finally:
            _stop_service(server)
    result = {"benchmark": "api_load", "clients": args.clients, "seconds": seconds, "latency": latency,
              "seconds_post_to_first_submodel_step": first_step, "targets": {"p99_ms": 50, "first_step_s": 10}}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
