"""A small client of the REST API, used by the CLI (`moedisco submit|jobs|status|cost|cancel|experts|users|tokens`,
`moedisco demo`).

    client = ApiClient()              # MOEDISCO_API_URL (default http://127.0.0.1:8000), MOEDISCO_API_TOKEN
    job = client.submit(spec_dict); client.job(job["id"])["state"]
    client.create_user("ada", monthly_budget_usd=50.0); client.create_token("ada")["token"]   # an admin's token

Errors come back as `ApiError` whose message lists a 422's fields one per line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class ApiError(RuntimeError):
    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code = status_code


def _message(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    if isinstance(detail, list):  # FastAPI's field errors
        lines = [f"  {'.'.join(str(p) for p in e.get('loc', [])[1:]) or '(body)'}: {e.get('msg')}" for e in detail]
        detail = "invalid job spec:\n" + "\n".join(lines)
    return f"HTTP {response.status_code}: {detail}"


class ApiClient:
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None):
        url = url or os.environ.get("MOEDISCO_API_URL") or DEFAULT_URL
        token = token or os.environ.get("MOEDISCO_API_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout, transport=transport)

    def request(self, method: str, path: str, **kwargs) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise ApiError(0, f"cannot reach the moedisco API at {self.http.base_url} ({error})") from None
        if response.is_error:
            raise ApiError(response.status_code, _message(response))
        return response.json() if response.content else None

    def submit(self, spec: dict) -> dict:
        return self.request("POST", "/v1/jobs", json=spec)

    def jobs(self, states: list[str] | None = None, offset: int = 0, limit: int = 20) -> dict:
        return self.request("GET", "/v1/jobs", params={"state": states or [], "offset": offset, "limit": limit})

    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/v1/jobs/{job_id}")

    def cost(self, job_id: str) -> dict:
        return self.request("GET", f"/v1/jobs/{job_id}/cost")

    def cluster(self) -> dict:
        """Worker nodes by node group and the launches not up yet (`GET /v1/cluster`)."""
        return self.request("GET", "/v1/cluster")

    def evaluation(self, job_id: str) -> dict | None:
        """The job's downstream scores, or None while it has none (404)."""
        try:
            return self.request("GET", f"/v1/jobs/{job_id}/evaluation")
        except ApiError as error:
            if error.status_code == 404:
                return None
            raise

    def experts(self, job_id: str) -> dict:
        """The final model's experts and, for an extension or a retirement, the loss per domain."""
        return self.request("GET", f"/v1/jobs/{job_id}/experts")

    def cancel(self, job_id: str) -> dict:
        return self.request("POST", f"/v1/jobs/{job_id}/cancel")

    def resume(self, job_id: str) -> dict:
        return self.request("POST", f"/v1/jobs/{job_id}/resume")

    # --- users and tokens ---------------------------------------------------------------------------------------

    def me(self) -> dict:
        return self.request("GET", "/v1/users/me")

    def users(self) -> list[dict]:
        return self.request("GET", "/v1/users")

    def create_user(self, name: str, **limits) -> dict:
        """`limits`: is_admin, monthly_budget_usd, max_queued_jobs."""
        return self.request("POST", "/v1/users", json={"name": name, **limits})

    def update_user(self, name: str, **limits) -> dict:
        return self.request("PATCH", f"/v1/users/{name}", json=limits)

    def revoke_user(self, name: str) -> dict:
        return self.request("POST", f"/v1/users/{name}/revoke")

    def create_token(self, user: str, label: str | None = None) -> dict:
        return self.request("POST", f"/v1/users/{user}/tokens", json={"label": label})

    def tokens(self, user: str) -> list[dict]:
        return self.request("GET", f"/v1/users/{user}/tokens")

    def revoke_token(self, user: str, token_id: str) -> None:
        self.request("DELETE", f"/v1/users/{user}/tokens/{token_id}")

    def upload(self, path: Path, name: str | None = None, shared: bool = False, text_field: str = "text") -> dict:
        """Stream a local corpus file to the server; the answer's `path` is what a spec's data.train names."""
        params = {"name": name or path.name, "shared": shared, "text_field": text_field}
        with path.open("rb") as handle:  # a file object: httpx streams it, with its length
            return self.request("POST", "/v1/files", params=params, content=handle, timeout=None)

    def files(self, shared: bool = False) -> list[dict]:
        return self.request("GET", "/v1/files", params={"shared": shared})

    def delete_file(self, name: str, shared: bool = False) -> None:
        self.request("DELETE", f"/v1/files/{name}", params={"shared": shared})
