"""Control-plane latency under load, and the time from submission to the first training steps.

    python benchmarks/api_load.py [--quick] [--clients 50] [--seconds 20] [--interval 0.5]

Starts the real service (`moedisco serve --runner ray`: Ray Serve on a local simulated cluster) on loopback and
submits examples/tiny.yaml. Then:

1. **time to first step**: seconds from `POST /v1/jobs` until the job reports its first training record on the cheap
   tier (any stage: the shared warm-up counts) and its first submodel record (the loop's step-0 evaluation, logged
   right before step 1), with when each stage before them started and finished;
2. **while the job trains**, `--clients` concurrent clients for `--seconds`, each alternating
   `GET /v1/jobs/{id}` and `GET /v1/jobs/{id}/cost`, twice:
   - `closed_loop` (saturation): every client sends its next request as soon as the previous one answers, so the
     latency is what 50 clients that never pause can drive the service to; by Little's law it is about
     clients / throughput, whatever the server does;
   - `paced` (a dashboard or `moedisco status --follow`): every client sends one request every `--interval`
     seconds on a fixed schedule (clients staggered over the interval). Latency is counted from the *scheduled*
     send time, so a service that falls behind shows it (no coordinated omission); `late` counts requests sent
     more than 10 ms after their time (the client's previous one had not answered, or the load generator itself
     got no CPU in time), and `all_from_send` times the same requests from when they were actually sent;
3. **idle**: the same two phases once the job has finished (the service idle, the machine not training).

Each phase records the machine's load average (1/5/15 min) before and after, the job's state and stage, and how late
the load generator's own event loop woke up (`client_loop_lag_ms`: on a saturated machine the generator waits for
the CPU too, and that wait is inside every latency it reports). Only
127.0.0.1 is contacted; every loop is bounded in count and time. Targets: p99 < 50 ms; < 10 s to the first
submodel step. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import aiohttp
import httpx
from _common import REPO

from moedisco.job.registry import STAGES
from moedisco_cli.common import read_spec_file
from moedisco_cli.demo import start_service, stop_service, wait_healthy
from service.schemas import TERMINAL_STATES

MAX_REQUESTS = 200_000
CHEAP_TRAINING_STAGES = {stage.name for stage in STAGES if stage.trained and stage.tier == "submodel_tier"}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


# --- time to the first training steps -----------------------------------------------------------------------------


def _stage_timeline(job: dict) -> list[dict]:
    """When each stage started and finished, in seconds after the job was created (the server's clock)."""
    created = _parse_time(job["created_at"])

    def since(value: str | None) -> float | None:
        moment = _parse_time(value)
        return None if moment is None else round((moment - created).total_seconds(), 2)

    return [{"stage": s["stage"] if s["expert"] is None else f"{s['stage']}/{s['expert']}",
             "started_s": since(s["started_at"]), "finished_s": since(s["finished_at"])} for s in job["stages"]]


def time_to_first_steps(url: str, job_id: str, submitted: float, timeout_s: float = 900.0) -> dict:
    """Poll the job every 0.1 s until a submodel has logged its first record."""
    deadline, seen = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
        now = time.monotonic() - submitted
        if job["state"] == "running":
            seen.setdefault("job_running_s", now)
        stepped = {s["stage"] for s in job["stages"] if s.get("step") is not None}
        if stepped & CHEAP_TRAINING_STAGES:
            seen.setdefault("post_to_first_training_step_s", now)
        if "submodel" in stepped:
            seen["post_to_first_submodel_step_s"] = now
            break
        if job["state"] in TERMINAL_STATES:
            raise RuntimeError(f"job {job_id} {job['state']}: {job.get('reason')}")
        time.sleep(0.1)
    else:
        raise TimeoutError(f"no submodel step within {timeout_s} s")
    started = _parse_time(job["started_at"])
    seen["created_to_claimed_s"] = (started - _parse_time(job["created_at"])).total_seconds() if started else None
    return {key: round(value, 2) if isinstance(value, float) else value for key, value in seen.items()} | {
        "stages_s_after_post": _stage_timeline(job)}


# --- load --------------------------------------------------------------------------------------------------------


def _percentile(sorted_ms: list[float], q: float) -> float | None:
    if not sorted_ms:
        return None
    return round(sorted_ms[min(len(sorted_ms) - 1, math.ceil(q * len(sorted_ms)) - 1)], 2)


def _summary(latencies_s: list[float]) -> dict:
    ms = sorted(1000 * x for x in latencies_s)
    return {"requests": len(ms), "p50_ms": _percentile(ms, 0.50), "p90_ms": _percentile(ms, 0.90),
            "p99_ms": _percentile(ms, 0.99), "max_ms": round(ms[-1], 2) if ms else None,
            "mean_ms": round(sum(ms) / len(ms), 2) if ms else None}


async def _get(http: aiohttp.ClientSession, path: str) -> int:
    try:
        async with http.get(path) as response:
            await response.read()
            return response.status
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return 0  # a timeout or a refused connection: counted as an error


async def _closed_loop_client(http, paths, first, until, records, budget):
    turn = first
    while time.perf_counter() < until and budget[0] > 0:
        budget[0] -= 1
        path = paths[turn % len(paths)]
        sent = time.perf_counter()
        status_code = await _get(http, path)
        done = time.perf_counter()
        records.append((path, done - sent, status_code, False, done - sent))
        turn += 1


async def _paced_client(http, paths, first, start, interval_s, until, records):
    turn = 0
    while (scheduled := start + turn * interval_s) < until:
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent = time.perf_counter()
        late = sent - scheduled > 0.010  # the previous request was still out, or this process got no CPU in time
        path = paths[(first + turn) % len(paths)]
        status_code = await _get(http, path)
        done = time.perf_counter()
        records.append((path, done - scheduled, status_code, late, done - sent))
        turn += 1


async def _heartbeat(until: float, lags: list[float], period_s: float = 0.01) -> None:
    """How late this process's event loop wakes up: on a saturated machine the load generator itself waits for the
    CPU, and that wait is in every latency it measures."""
    while time.perf_counter() < until:
        asked = time.perf_counter()
        await asyncio.sleep(period_s)
        lags.append(time.perf_counter() - asked - period_s)


async def _load(url: str, paths: list[str], clients: int, seconds: float, interval_s: float | None) -> tuple:
    # aiohttp, not httpx: on two cores the load generator's own CPU time is taken from the service it measures,
    # and aiohttp's client needs several times less per request.
    records: list[tuple] = []
    lags: list[float] = []
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as http:
        await asyncio.gather(*(_get(http, path) for path in paths))  # open a connection; warm the routes
        start = time.perf_counter()
        until = start + seconds
        if interval_s is None:
            budget = [MAX_REQUESTS]
            runs = [_closed_loop_client(http, paths, i, until, records, budget) for i in range(clients)]
        else:
            runs = [_paced_client(http, paths, i, start + i * interval_s / clients, interval_s, until, records)
                    for i in range(clients)]
        await asyncio.gather(_heartbeat(until, lags), *runs)
        elapsed = time.perf_counter() - start
    return records, elapsed, lags


def run_phase(url: str, job_id: str, clients: int, seconds: float, interval_s: float | None) -> dict:
    paths = [f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/cost"]
    before = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
    load_before = load_average()
    records, elapsed, lags = asyncio.run(_load(url, paths, clients, seconds, interval_s))
    load_after = load_average()
    after = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
    result = {"mode": "closed_loop" if interval_s is None else "paced", "clients": clients, "seconds": seconds}
    if interval_s is not None:
        result["interval_s"] = interval_s
        result["offered_requests_per_s"] = round(clients / interval_s, 1)
        result["latency_from"] = "scheduled send time"
    for path in paths:
        result[path.replace(job_id, "{id}")] = _summary([r[1] for r in records if r[0] == path])
    result["all"] = _summary([r[1] for r in records])
    if interval_s is not None:  # the same requests timed from when they were actually sent
        result["all_from_send"] = _summary([r[4] for r in records])
    result["requests_per_s"] = round(len(records) / elapsed, 1)
    result["errors"] = sum(1 for r in records if r[2] != 200)
    if interval_s is not None:
        result["late"] = sum(1 for r in records if r[3])
    lag_ms = _summary(lags)
    result["client_loop_lag_ms"] = {key: lag_ms[key] for key in ("p50_ms", "p99_ms", "max_ms")}
    result["load_average_before"], result["load_average_after"] = load_before, load_after
    result["job_before"] = {"state": before["state"], "stage": before["current_stage"]}
    result["job_after"] = {"state": after["state"], "stage": after["current_stage"]}
    return result


def wait_for_end(url: str, job_id: str, timeout_s: float = 900.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
        if job["state"] in TERMINAL_STATES:
            return job
        time.sleep(1.0)
    raise TimeoutError(f"job {job_id} did not finish within {timeout_s} s")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0, help="Length of each load phase.")
    parser.add_argument("--interval", type=float, default=0.5, help="Seconds between a paced client's requests.")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--quick", action="store_true", help="10 s per load phase.")
    parser.add_argument("--no-idle", action="store_true", help="Skip the idle phases (no wait for the job's end).")
    args = parser.parse_args(argv)
    seconds = 10.0 if args.quick else args.seconds
    url = f"http://127.0.0.1:{args.port}"
    result = {"benchmark": "api_load", "load_average_at_start": load_average(), "cpus": os.cpu_count()}
    # The service helpers print status lines; stdout carries only the JSON.
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        server = start_service(args.port, Path(tmp))
        try:
            wait_healthy(url, server, Path(tmp) / "service.log")
            submitted = time.monotonic()
            job = httpx.post(f"{url}/v1/jobs", json=read_spec_file(REPO / "examples" / "tiny.yaml", []),
                             timeout=30).json()
            result["time_to_first_step"] = time_to_first_steps(url, job["id"], submitted)
            result["training"] = {
                "closed_loop": run_phase(url, job["id"], args.clients, seconds, None),
                "paced": run_phase(url, job["id"], args.clients, seconds, args.interval)}
            if not args.no_idle:
                finished = wait_for_end(url, job["id"])
                result["job_state"] = finished["state"]
                time.sleep(5.0)  # let the finished job's processes exit
                result["idle"] = {
                    "closed_loop": run_phase(url, job["id"], args.clients, seconds, None),
                    "paced": run_phase(url, job["id"], args.clients, seconds, args.interval)}
        finally:
            stop_service(server)
    result["targets"] = {"p99_ms": 50, "post_to_first_submodel_step_s": 10}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
