"""Service settings, read from `MOEDISCO_*` environment variables (pydantic-settings).

    settings = Settings()                          # MOEDISCO_API_TOKEN, MOEDISCO_DATABASE_URL, MOEDISCO_DATA_DIR ...
    settings = Settings(data_dir=tmp, runner="local", api_token="t")   # tests pass values directly
    settings.effective_host()                      # MOEDISCO_HOST; refused beyond loopback without a token

Each field's description is its documentation (this is the service's configuration reference); a RayService's
`args:` block sets the same fields by name (`service.serve`). Without MOEDISCO_API_TOKEN the service is open, so it
binds to loopback only.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


BILLING_FIELDS = ("prices", "node_groups", "price_changes", "idle_timeout_s")  # a spec's `resources` keys the
# operator sets: a user who could set them could bill their jobs at nothing and pass every budget


def read_prices(path: Path | None) -> dict:
    """The billing keys of a `resources` section, from `path` (YAML) over the defaults, validated as one."""
    import yaml

    from moedisco.config.resources import ResourcesConfig

    given = {}
    if path is not None:
        given = yaml.safe_load(Path(path).read_text()) or {}
        unknown = sorted(set(given) - set(BILLING_FIELDS)) if isinstance(given, dict) else ["(not a mapping)"]
        if unknown:
            raise ValueError(f"MOEDISCO_PRICES_FILE {path}: only {', '.join(BILLING_FIELDS)} may be set, not "
                             f"{', '.join(unknown)}")
    resources = ResourcesConfig.model_validate(given)
    return resources.model_dump(mode="json", include=set(BILLING_FIELDS))


@dataclass(frozen=True)
class AccessRules:
    """The places users' jobs may read and write: what a job's runner needs to check a spec again when it starts."""

    data_dir: Path
    input_roots: tuple[Path, ...]  # read by every user, as `shared_dir`
    storage_roots: tuple[str, ...]  # object-storage prefixes; `{user}` in one makes it each user's own

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def users_dir(self) -> Path:
        return self.data_dir / "users"

    def user_dir(self, name: str) -> Path:
        """A user's own area: their uploads, readable by their jobs only."""
        return self.users_dir / name

    @property
    def shared_dir(self) -> Path:
        """The area every user's jobs may read and an admin fills."""
        return self.data_dir / "shared"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MOEDISCO_", extra="ignore")

    api_token: SecretStr | None = Field(
        None, description="The bootstrap admin's bearer token (user `admin`): it creates users and their tokens "
                          "(`moedisco users create`), and owns the jobs stored before users existed.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; unset = SQLite file DATA_DIR/moedisco.db.")
    data_dir: Path = Field(Path.home() / ".moedisco", description="Jobs live in DATA_DIR/jobs/<id>/.")
    input_roots: list[Path] = Field(
        default_factory=list,
        description="Folders every user's input paths (data, tokenizer, models) may read, as DATA_DIR/shared/.")
    storage_roots: list[str] = Field(
        default_factory=list,
        description="Object-storage prefixes (s3://bucket/prefix); one with {user} is each user's own, others "
                    "are shared and read-only; none by default.")
    host: str = Field(LOOPBACK, description="Address to bind; only loopback when no token is set.")
    port: int = Field(8000, ge=1, le=65535, description="Port to bind.")
    runner: Literal["local", "ray"] = Field("ray", description="`ray`: stages placed on the cluster's tiers; "
                                                              "`local`: the whole job inside its actor.")
    max_running_jobs: int = Field(2, ge=1, description="Jobs running at once; the others wait in the queue.")
    max_attempts: int = Field(3, ge=1, description="Runner starts charged to one job (its runner lost to the job "
                                                   "itself: a crash, killed for memory) before a lost runner fails it.")
    max_cluster_restarts: int = Field(
        20, ge=0, description="Relaunches of one job after cluster events (a node or cluster lost, an upgrade's "
                              "handover) before it fails: a bound on a loop, not a budget of failures.")
    ray_address: str | None = Field(None, description="Ray cluster to join when not already inside one.")
    ray_namespace: str = Field("moedisco", description="Ray namespace of the detached job actors.")
    dispatch_interval_s: float = Field(2.0, gt=0, description="Seconds between queue/reconcile passes.")
    lease_ttl_s: float = Field(
        60.0, gt=0, description="A job's runner renews its lease in the store every third of this; a running job "
                                "is relaunched only once its lease is older (its runner is gone, on any cluster).")
    serve_num_replicas: int = Field(1, ge=1, description="Ray Serve replicas of the API; with more than one, "
                                                         "the dispatcher runs in a deployment of its own.")
    serve_max_ongoing_requests: int = Field(64, ge=1, description="Requests one API replica works on at once; "
                                                                  "the rest wait in Serve's proxy.")
    serve_access_log: bool = Field(True, description="Ray Serve's log line per request (replica logs).")
    api_niceness: int | None = Field(
        0, ge=-20, le=19, description="Niceness of the API's Ray Serve replicas (Ray starts workers at 15, as low "
                                      "as training); lowering it needs CAP_SYS_NICE. None keeps Ray's.")
    max_request_bytes: int = Field(
        1_000_000, ge=1024, description="Largest request body accepted; a longer one is refused with 413 before it "
                                        "is read (a job spec is a few kB).")
    max_upload_bytes: int = Field(1 << 30, ge=1024, description="Largest file one upload (POST /v1/files) may send.")
    user_quota_bytes: int = Field(10 << 30, ge=1024, description="Most bytes of uploads a user may keep on the server.")
    max_model_parameters: float = Field(
        1e13, gt=0, description="A spec whose model (built from its widths, not a checkpoint) would have more "
                                "parameters than this is refused with 422: a sanity bound, not a memory plan.")
    max_queued_jobs_per_user: int | None = Field(
        20, ge=0, description="Jobs one user may have queued at once, unless their own `max_queued_jobs` says "
                              "otherwise; None: no limit. The bootstrap admin has none.")
    prices_file: Path | None = Field(
        None, description="YAML of the cluster's prices, with any of a spec's `resources` keys `prices`, "
        "`node_groups`, `price_changes`, `idle_timeout_s`; unset = moedisco's defaults. Every job is billed at these: "
        "what a spec says of them is replaced when it is submitted.")
    read_cache_max_age_s: float = Field(
        2.0, ge=0, description="The job and cost views are rebuilt whenever the job changes (its version in the "
                               "store), and at the latest after this many seconds; 0 rebuilds them on every read.")

    @field_validator("api_token", mode="after")
    @classmethod
    def _blank_is_unset(cls, token: SecretStr | None) -> SecretStr | None:
        return token if token is not None and token.get_secret_value().strip() else None

    @field_validator("storage_roots", mode="after")
    @classmethod
    def _plain_bucket_prefixes(cls, roots: list[str]) -> list[str]:
        from moedisco.io.storage import plain_parts

        for root in roots:
            try:
                plain_parts(root)
            except ValueError as error:  # e.g. `s3://` alone, which would cover every bucket
                raise ValueError(f"MOEDISCO_STORAGE_ROOTS entry {root!r} is not a bucket prefix: it {error}") from None
            if "{user}" in root and (root.count("{user}") > 1 or not root.rstrip("/").endswith("/{user}")):
                # `s3://w/{user}-tmp` would give user `ada-tmp` a prefix inside ada's `s3://w/ada-tmp`
                raise ValueError(f"MOEDISCO_STORAGE_ROOTS entry {root!r}: {{user}} must be the whole last segment")
        return roots

    @field_validator("prices_file", mode="after")
    @classmethod
    def _prices_readable(cls, path: Path | None) -> Path | None:
        if path is not None:
            read_prices(path)  # a bad file stops the service at start, not the first submission
        return path

    def billing(self) -> dict:
        """The `resources` keys the operator sets for every job (`prices_file`), with moedisco's defaults."""
        return read_prices(self.prices_file)

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir.resolve() / 'moedisco.db'}"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir.resolve() / "jobs"

    @property
    def access(self) -> AccessRules:
        """What users' jobs may read and write (`service.jobs.access`), without the service's secrets."""
        return AccessRules(self.data_dir.resolve(), tuple(root.resolve() for root in self.input_roots),
                           tuple(self.storage_roots))

    def effective_host(self) -> str:
        """The address to bind. Without a token, anyone who reaches the port could run jobs as the admin, so an
        open API binds to loopback only: any other address is refused (`ValueError`), not silently narrowed."""
        if self.api_token is None and not is_loopback(self.host):
            raise ValueError(f"MOEDISCO_HOST is {self.host} but MOEDISCO_API_TOKEN is not set: an API without a "
                             f"token serves loopback only; set MOEDISCO_API_TOKEN or bind {LOOPBACK}")
        return self.host

    def startup_notice(self) -> str:
        if self.api_token is None:
            return ("no MOEDISCO_API_TOKEN configured: the API is open, so it serves loopback clients only "
                    "(set MOEDISCO_API_TOKEN to serve other hosts)")
        return "bearer-token auth enabled (MOEDISCO_API_TOKEN is the admin; users' tokens are in the store)"
