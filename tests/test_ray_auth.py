"""Clients of a Ray cluster with token authentication: moedisco's connections send Ray's token, and a refusal says
that the cluster wants one (RAY_AUTH_MODE=token and the token) instead of Ray's bare "Failed to connect".

A real head (`ray start --head --block`, RAY_AUTH_MODE=token, a token of its own) runs in a process group started
here and stopped here. Every client is a subprocess with a home directory of its own and no RAY_AUTH_* or
RAY_ADDRESS variable but those a test sets, so neither ~/.ray/auth_token of this machine nor this process's Ray
state plays a part. A refused client costs Ray's 20 s of retries; they run side by side.

    pytest tests/test_ray_auth.py -q
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ray_cluster.auth import RayAuthError, is_auth_refusal, refusal_message
from ray_cluster.local_cluster import free_port
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
RAY = str(Path(PYTHON).with_name("ray"))
START_TIMEOUT_S = 120
CLIENT_TIMEOUT_S = 150  # Ray retries a refused connection for about 20 s; two cores, several clients at once
AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")

# Runs `ray_cluster.auth.connect` in a client process and prints what happened as one JSON line.
CONNECT = """
import json, sys
from ray_cluster.auth import RayAuthError, connect
try:
    connect(sys.argv[1], log_to_driver=False, logging_level="ERROR")
    import ray
    print(json.dumps({"connected": True, "cpus": ray.cluster_resources().get("CPU")}))
except RayAuthError as error:
    print(json.dumps({"connected": False, "type": "RayAuthError", "message": str(error)}))
except Exception as error:
    print(json.dumps({"connected": False, "type": type(error).__name__, "message": str(error)}))
"""


def client_env(home: Path, **variables: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in AUTH_VARIABLES}
    return {**env, "HOME": str(home), "PYTHONPATH": str(REPO), **variables}


def _processes_under(marker: str) -> list[int]:
    """Processes whose command line names `marker` (the head's own temp dir): the ones the head started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.fixture(scope="module")
def token_head():
    """A Ray head that requires a token: (address, token)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rauth", dir="/tmp"))  # short: Ray's socket paths live under it
    home = temp_dir / "home"
    home.mkdir()
    token, port = secrets.token_hex(16), free_port()
    env = client_env(home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    log = open(temp_dir / "head.log", "w")
    command = [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
               f"--object-store-memory={100 * 2**20}", f"--dashboard-agent-listen-port={free_port()}",
               f"--temp-dir={temp_dir / 'ray'}", "--disable-usage-stats"]
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: "Ray runtime started" in (temp_dir / "head.log").read_text() or head.poll() is not None,
                   START_TIMEOUT_S, 0.5, "the token-auth Ray head to start")
        if head.poll() is not None:
            pytest.fail(f"`ray start` exited with {head.returncode}:\n{(temp_dir / 'head.log').read_text()[-3000:]}")
        address = next(line.split("--address='")[1].split("'")[0] for line in (temp_dir / "head.log").read_text()
                       .splitlines() if "ray start --address='" in line)
        yield address, token
    finally:
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)  # its own session: only what this fixture started
                head.wait(timeout=10)
        for pid in _processes_under(str(temp_dir)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def start_client(args: list[str], home: Path, **variables: str) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, *args], env=client_env(home, **variables), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(client: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = client.communicate(timeout=CLIENT_TIMEOUT_S)
    return client.returncode, stdout, stderr


def outcome(client: subprocess.Popen) -> dict:
    code, stdout, stderr = finish(client)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert code == 0 and lines, f"client failed ({code}):\n{stdout}\n{stderr[-3000:]}"
    return json.loads(lines[-1])


def test_refused_clients_are_told_the_cluster_wants_a_token(token_head, tmp_path):
    address, token = token_head
    # All at once: each refusal waits out Ray's retries.
    no_token = start_client(["-c", CONNECT, address], tmp_path)
    wrong_token = start_client(["-c", CONNECT, address], tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-it")
    status = start_client(["-m", "moedisco_cli.main", "cluster", "status", "--address", address], tmp_path)
    run = start_client(["-m", "moedisco_cli.main", "run", str(REPO / "examples" / "tiny.yaml"), "--runner", "ray",
                        "--address", address, "--quiet", "--set", f"output_dir={tmp_path / 'run'}"], tmp_path)
    mode_only = start_client(["-c", CONNECT, address], tmp_path, RAY_AUTH_MODE="token")  # no token anywhere

    refused = outcome(no_token)
    assert refused["type"] == "RayAuthError", refused
    assert f"the Ray cluster at {address} requires token authentication" in refused["message"]
    assert "RAY_AUTH_MODE=token" in refused["message"] and "RAY_AUTH_TOKEN" in refused["message"]
    assert "~/.ray/auth_token" in refused["message"] and "InvalidAuthToken" in refused["message"]

    wrong = outcome(wrong_token)
    assert wrong["type"] == "RayAuthError", wrong
    assert "refused the Ray auth token from RAY_AUTH_TOKEN" in wrong["message"]

    missing = outcome(mode_only)
    assert missing["type"] == "RayAuthError", missing
    assert "RAY_AUTH_MODE=token is set but no Ray auth token was found" in missing["message"]

    code, stdout, stderr = finish(status)  # the command prints the reason and exits 1, without a traceback
    assert code == 1, (stdout, stderr[-2000:])
    assert "requires token authentication" in " ".join(stdout.split()) and "Traceback" not in stderr

    code, stdout, stderr = finish(run)  # `moedisco run` too: the reason, exit 1, no traceback
    assert code == 1, (stdout, stderr[-2000:])
    assert "requires token authentication" in " ".join(stdout.split()) and "Traceback" not in stderr


def test_clients_with_the_token_connect(token_head, tmp_path):
    address, token = token_head
    token_file = tmp_path / "ray-token"
    token_file.write_text(token)
    by_file = start_client(["-c", CONNECT, address], tmp_path, RAY_AUTH_MODE="token",
                           RAY_AUTH_TOKEN_PATH=str(token_file))
    status = start_client(["-m", "moedisco_cli.main", "cluster", "status", "--address", address], tmp_path,
                          RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    home_file = tmp_path / "home"
    (home_file / ".ray").mkdir(parents=True)
    (home_file / ".ray" / "auth_token").write_text(token)
    by_home = start_client(["-c", CONNECT, address], home_file, RAY_AUTH_MODE="token")

    assert outcome(by_file) == {"connected": True, "cpus": 1.0}
    assert outcome(by_home) == {"connected": True, "cpus": 1.0}
    code, stdout, stderr = finish(status)
    assert code == 0, (stdout, stderr[-2000:])
    assert f"cluster {address}" in stdout and "CPU=1" in stdout


def test_the_local_cluster_requires_its_token_and_its_clients_send_it(tmp_path):
    # Its GCS and raylets listen on every interface of the machine: without a token anyone who reaches them could
    # run code here. Started as `moedisco cluster start` does (a keeper process), with a home of its own.
    home, state = tmp_path / "home", tmp_path / "state" / "local_cluster.json"
    home.mkdir()
    cli = ["-m", "moedisco_cli.main", "cluster"]
    started = start_client([*cli, "start", "--static", "--cheap-nodes", "1", "--expensive-nodes", "0"], home,
                           MOEDISCO_CLUSTER_STATE=str(state))
    try:
        code, stdout, stderr = finish(started)
        assert code == 0, (stdout, stderr[-3000:])
        recorded = json.loads(state.read_text())
        assert recorded["auth"] == "token"
        token_file = home / ".ray" / "auth_token"  # there was none: the cluster wrote one, for its owner only
        assert token_file.stat().st_mode & 0o777 == 0o600 and len(token_file.read_text()) >= 32
        assert "Ray token authentication is on" in " ".join(stdout.split())

        stranger = start_client(["-c", CONNECT, recorded["address"]], tmp_path)  # another home: no token
        status = start_client([*cli, "status"], home, MOEDISCO_CLUSTER_STATE=str(state))  # no RAY_AUTH_MODE set
        code, stdout, stderr = finish(status)
        assert code == 0, (stdout, stderr[-3000:])
        assert "gpu_type=4090" in stdout and "gpu_type=head" in stdout
        refused = outcome(stranger)
        assert refused["type"] == "RayAuthError" and "requires token authentication" in refused["message"]
    finally:
        stopped = start_client([*cli, "stop"], home, MOEDISCO_CLUSTER_STATE=str(state))
        assert finish(stopped)[0] == 0


# ---- the message logic on Ray's own exceptions, without a cluster ---------------------------------------------


def ray_refusal() -> ConnectionError:
    """The chain ray.init raises when the GCS refuses the client (as Ray 2.60 builds it, messages abridged)."""
    from ray.exceptions import AuthenticationError

    try:
        try:
            try:
                raise AuthenticationError("RPC error: InvalidAuthToken: Authentication token is missing or incorrect")
            except AuthenticationError as inner:
                raise RuntimeError(f"Failed to connect to GCS. Last connection error: Traceback ...\n"
                                   f"ray.exceptions.AuthenticationError: {inner}") from None
        except RuntimeError as gcs:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379") from gcs
    except ConnectionError as error:
        return error


def test_refusals_are_recognised_and_explained(monkeypatch):
    for variable in AUTH_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", "/nonexistent-home")
    error = ray_refusal()
    assert is_auth_refusal(error)
    assert not is_auth_refusal(ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379"))
    message = refusal_message("10.0.0.5:6379", error)
    assert message.startswith("the Ray cluster at 10.0.0.5:6379 requires token authentication")
    assert "set RAY_AUTH_MODE=token" in message and "RAY_AUTH_TOKEN_PATH" in message
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x")
    assert "refused the Ray auth token from RAY_AUTH_TOKEN" in refusal_message("10.0.0.5:6379", error)
    assert issubclass(RayAuthError, ConnectionError)  # callers that handle a lost cluster handle this too
