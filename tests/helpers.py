"""Helpers for tests of the service (like `fastapi.testclient` or `ray.cluster_utils`): ports, servers, polling.

    from tests.helpers import LiveServer, ServiceProcess, wait_for_state

    with LiveServer(create_app(settings)) as url: httpx.get(url + "/healthz")        # uvicorn in a thread
    with ServiceProcess(["--address", address], env) as service: service.kill()      # `moedisco serve` subprocess
    job = wait_for_state(client, job_id, TERMINAL_STATES, timeout_s=120)

Everything binds to 127.0.0.1, every loop is bounded in time, and every process started here is stopped here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from moedisco.io.documents import DataError, iter_documents
from moedisco_cli.api_client import ApiClient
from ray_cluster.local_cluster import free_port

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]


def wait_until(predicate: Callable[[], T], timeout_s: float, interval_s: float = 0.25, what: str = "") -> T:
    """Poll `predicate` until it returns something truthy, which is returned; TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout_s:.0f} s: {what or predicate}")
        time.sleep(interval_s)


@contextlib.contextmanager
def connected_cluster(spec) -> Iterator[str]:
    """A local cluster (`ray_cluster.local_cluster.LocalClusterSpec`) started in this process, and this process
    connected to it; yields its address, and stops only what it started."""
    import ray

    from ray_cluster.local_cluster import start_local_cluster, stop_local_cluster

    address = start_local_cluster(spec=spec)
    ray.init(address=address, log_to_driver=False)
    try:
        yield address
    finally:
        ray.shutdown()
        stop_local_cluster()


def add_local_node(labels: dict[str, str], num_gpus: int = 1, num_cpus: float = 1.0) -> str:
    """Add a node to the local cluster this process started (`ray_cluster.local_cluster`), as an autoscaler adds a
    pod; returns its node id. Its object store is the size of a default cluster's nodes'."""
    from ray_cluster import local_cluster

    cluster = local_cluster._in_process
    if cluster is None:
        raise RuntimeError("no local cluster runs in this process; start_local_cluster() first")
    memory = local_cluster.LocalClusterSpec.object_store_mb * 2**20
    with local_cluster.environment(RAY_ADDRESS=cluster.address):  # as the cluster's own nodes were started
        node = cluster.add_node(num_cpus=num_cpus, num_gpus=num_gpus, object_store_memory=memory, labels=labels)
    return node.node_id


def wait_for_state(client: ApiClient, job_id: str, states: tuple[str, ...], timeout_s: float) -> dict:
    def reached() -> dict | None:
        job = client.job(job_id)
        return job if job["state"] in states else None

    return wait_until(reached, timeout_s, 0.5, f"job {job_id} in {states}")


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class LiveServer:
    """The app on uvicorn in a background thread, on a free loopback port."""

    def __init__(self, app, timeout_s: float = 60):
        import uvicorn

        self.port, self.timeout_s = free_port(), timeout_s
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        wait_until(lambda: self.server.started, self.timeout_s, what="uvicorn started")
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class ServiceProcess:
    """`python -m moedisco_cli.main serve --no-ray-serve ARGS` as a subprocess, output in `log_path`."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, timeout_s: float = 120):
        self.port = free_port()
        self.args, self.env, self.log_path, self.timeout_s = args, env, log_path, timeout_s
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServiceProcess:
        command = [sys.executable, "-m", "moedisco_cli.main", "serve", "--no-ray-serve", "--port", str(self.port),
                   *self.args]
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **self.env}, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: healthy(self.url) or self._exited(), self.timeout_s, 0.5, "service healthy")
        if self._exited():
            raise RuntimeError(f"service exited with {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}")
        return self

    def _exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown hooks run."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


def service_process_env(tmp_path: Path, token: str, namespace: str, corpus_dir: Path, **settings: str) -> dict:
    """The environment of a `ServiceProcess` whose runners outlive it on a Ray cluster: its data and SQLite store
    under `tmp_path`, the local runner, quick dispatch passes, and a killed runner taken for gone after 6 s without
    renewing its lease; `settings`: more MOEDISCO_* variables, by field name."""
    env = {"MOEDISCO_DATA_DIR": str(tmp_path / "data"), "MOEDISCO_API_TOKEN": token,
           "MOEDISCO_DATABASE_URL": f"sqlite:///{tmp_path / 'data' / 'moedisco.db'}",
           "MOEDISCO_INPUT_ROOTS": json.dumps([str(corpus_dir)]), "MOEDISCO_RAY_NAMESPACE": namespace,
           "MOEDISCO_RUNNER": "local", "MOEDISCO_DISPATCH_INTERVAL_S": "0.5", "MOEDISCO_LEASE_TTL_S": "6"}
    return {**env, **{f"MOEDISCO_{name.upper()}": value for name, value in settings.items()}}


def training_stage(store, job_id: str, past: int, left: int, stages=("submodel", "finetune")):
    """The job's running training stage once its step is at least `past` with `left` steps still to go, else
    None."""
    for stage in store.stages(job_id):
        if (stage.state == "running" and stage.stage in stages and stage.step is not None
                and past <= stage.step <= stage.total_steps - left):
            return stage
    return None


@dataclass
class TokenizedCorpus:
    """All documents' tokens in one flat array; `offsets[i]:offsets[i+1]` are document i's tokens (EOS included)."""

    tokens: np.ndarray
    offsets: np.ndarray

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def from_texts(cls, texts: list[str], tokenizer: PreTrainedTokenizerFast, batch_size: int = 512) -> TokenizedCorpus:
        eos = tokenizer.eos_token_id
        pieces = []
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(texts[start : start + batch_size], add_special_tokens=False)["input_ids"]
            pieces.extend(ids + [eos] for ids in encoded)
        lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        tokens = np.fromiter((t for p in pieces for t in p), dtype=np.int32, count=int(offsets[-1]))
        return cls(tokens=tokens, offsets=offsets)

    def save(self, path: Path) -> None:
        np.savez(path, tokens=self.tokens, offsets=self.offsets)

    @classmethod
    def load(cls, path: Path) -> TokenizedCorpus:
        with np.load(path) as arrays:
            return cls(tokens=arrays["tokens"], offsets=arrays["offsets"])

    def pack(self, seq_len: int, doc_ids: np.ndarray | None = None) -> torch.Tensor:
        """Concatenate the chosen documents and cut them into [N, L] sequences (the ragged tail is dropped)."""
        if doc_ids is None:
            stream = self.tokens
        else:
            stream = np.concatenate([self.tokens[self.offsets[i] : self.offsets[i + 1]] for i in doc_ids] or [[]])
        num_seqs = len(stream) // seq_len
        if num_seqs == 0:
            raise DataError(f"only {len(stream)} tokens: fewer than one sequence of {seq_len}; lower data.sequence_length")
        seqs_NL = torch.from_numpy(stream[: num_seqs * seq_len].astype(np.int64)).view(num_seqs, seq_len)
        return seqs_NL


def read_documents(path, cfg, report=None) -> list[str]:
    """`iter_documents` as a list: for corpora that fit in memory."""
    return list(iter_documents(path, cfg, report))
