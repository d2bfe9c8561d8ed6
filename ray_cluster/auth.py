"""Ray token authentication for moedisco's Ray clients and its local cluster.

    connect("10.0.0.5:6379", log_to_driver=False)   # ray.init; a refused token raises RayAuthError, which says so
    ensure_token()                                  # a token for a cluster started here (~/.ray/auth_token)

A cluster with token authentication (Ray >= 2.52; KubeRay's `authOptions`, `ray start` on a machine with
~/.ray/auth_token, `moedisco cluster start`) refuses every caller without its token. Ray's client sends the token
when RAY_AUTH_MODE=token is in its environment, and reads it from RAY_AUTH_TOKEN, else the file named by
RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token. For an explicit address Ray never turns token mode on by itself (only
`address="auto"` does, when a token exists): a client that leaves RAY_AUTH_MODE unset sends no token, and after about
20 s of retries Ray says only "Failed to connect to Ray cluster at ...". `connect` says instead that the cluster wants
a token and where the token goes. Nothing here removes these variables from any environment: Ray's worker processes,
trainers and the job actors inherit them from their node.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from pathlib import Path

log = logging.getLogger(__name__)

AUTH_MODE = "RAY_AUTH_MODE"
TOKEN = "RAY_AUTH_TOKEN"
TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"
# What Ray's refusal looks like anywhere in the chain of exceptions of a failed ray.init: the GCS answers
# "Unauthenticated: ... InvalidAuthToken: Authentication token is missing or incorrect", which Ray wraps in
# RuntimeError("Failed to connect to GCS ...") and then in ConnectionError("Failed to connect to Ray cluster at ...").
REFUSAL_MARKS = ("InvalidAuthToken", "AuthenticationError", "UNAUTHENTICATED", "Unauthenticated")
NO_TOKEN_MARK = "no authentication token was found"
WHERE_THE_TOKEN_GOES = (f"the cluster's token as {TOKEN}, or in a file named by {TOKEN_PATH}, or in ~/.ray/auth_token "
                        "(a KubeRay cluster's is the `auth_token` key of its Secret, see k8s/README.md)")


class RayAuthError(ConnectionError):
    """The Ray cluster refused this client for want of its token (or for a wrong one)."""


def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def token_auth_on() -> bool:
    """Whether this process's Ray clients send a token (RAY_AUTH_MODE=token)."""
    return os.environ.get(AUTH_MODE, "").strip().lower() == "token"


def token_source() -> str | None:
    """Where Ray would take this process's token from, in Ray's order; None when there is none."""
    if os.environ.get(TOKEN, "").strip():
        return TOKEN
    if path := os.environ.get(TOKEN_PATH):
        return f"{TOKEN_PATH} ({path})"
    path = default_token_path()
    try:
        return str(path) if path.read_text().strip() else None
    except OSError:  # none there, or not readable: Ray finds none either
        return None


def enable_token_auth() -> None:
    """RAY_AUTH_MODE=token for this process and the processes it starts (Ray nodes, their workers)."""
    if token_auth_on():
        return
    os.environ[AUTH_MODE] = "token"
    # Ray caches its configuration; ray.init() refreshes it the same way when it turns token mode on itself.
    from ray._raylet import Config

    Config.initialize("")


def ensure_token() -> str:
    """The source of this process's token, after writing a new random one to ~/.ray/auth_token if there is none
    (as ray.init() does for the local cluster it starts). Returns where the token is."""
    if (source := token_source()) is not None:
        return source
    path = default_token_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secrets.token_hex(32))
    log.info("wrote a new Ray auth token to %s", path)
    return str(path)


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def is_auth_refusal(error: BaseException) -> bool:
    """Whether a failed ray.init failed on authentication (checked on the whole chain of causes)."""
    from ray.exceptions import AuthenticationError

    return any(isinstance(link, AuthenticationError) or any(mark in str(link) for mark in REFUSAL_MARKS)
               for link in _chain(error))


def refusal_message(address: str, error: BaseException) -> str:
    """What to tell the user when the cluster at `address` refused this client (`is_auth_refusal(error)`)."""
    if any(NO_TOKEN_MARK in str(link) for link in _chain(error)):
        return (f"cannot connect to the Ray cluster at {address}: {AUTH_MODE}=token is set but no Ray auth token was "
                f"found; give {WHERE_THE_TOKEN_GOES}")
    if not token_auth_on():
        found = token_source()
        return (f"the Ray cluster at {address} requires token authentication and this client sent no token: set "
                f"{AUTH_MODE}=token" + (f" (a token is already in {found})" if found else "") +
                f" and give {WHERE_THE_TOKEN_GOES}")
    return (f"the Ray cluster at {address} refused the Ray auth token from {token_source() or 'nowhere'}: it is not "
            f"this cluster's token; give {WHERE_THE_TOKEN_GOES}")


def connect(address: str | None, token_expected: bool = False, **init_kwargs):
    """`ray.init(address=address, **init_kwargs)`, whose refusal for want of the cluster's token raises
    RayAuthError saying so. `token_expected`: the cluster is known to want a token (the local cluster that
    `moedisco cluster start` started), so token mode is turned on unless RAY_AUTH_MODE says otherwise."""
    import ray

    if token_expected and AUTH_MODE not in os.environ:
        enable_token_auth()
    try:
        return ray.init(address=address, **init_kwargs)
    except Exception as error:  # ray.init raises ConnectionError, RuntimeError or AuthenticationError
        if not is_auth_refusal(error):
            raise
        target = address or os.environ.get("RAY_ADDRESS") or "the local Ray instance"
        message = refusal_message(target, error)
        if reason := _ray_reason(error):
            message += f" (Ray: {reason})"
        refusal = RayAuthError(message)
        refusal.ray_error = error  # Ray's own exception, whose chain holds the whole story
        # Not chained: the chain is Ray's 20 s of retries and a traceback inside a message, which would bury this.
        raise refusal from None


def _ray_reason(error: BaseException) -> str | None:
    for link in _chain(error):
        if found := re.search(r"InvalidAuthToken: [^.\n]*", str(link)):
            return found.group(0)
    return None
