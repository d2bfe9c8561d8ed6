"""The job store's tables: one row per job, per stage (and expert), per event and per priced stage; the users who
own jobs and their API tokens; and `init_db`, which creates them.

    init_db(engine)                                # missing tables and columns created; safe on every start
    job = session.get(JobRow, job_id); job.state   # "queued" | "running" | "succeeded" | "failed" | "cancelled"
    job.owner                                      # a UserRow's name; "admin" for the bootstrap token's jobs

A job's `version` grows by one with every write to the job, its stages or its cost rows (`service.store.store` and
`service.jobs.recorder` bump it in the same transaction), so a reader can tell with one primary-key lookup whether
anything it built from them has changed (`service.reporting.views`).
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    inspect,
    text,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Who MOEDISCO_API_TOKEN (or an open, loopback-only service) acts as; jobs stored before users existed are its.
BOOTSTRAP_ADMIN = "admin"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Always timezone-aware UTC; SQLite keeps no zone and would hand back naive datetimes."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        return value.astimezone(timezone.utc) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


def stage_key(stage: str, expert: int | None) -> str:
    """A task's `moedisco.job.registry.Task.key` (stage, expert) as the one string a stage row is keyed by."""
    return stage if expert is None else f"{stage}/{expert}"


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class JobRow(Base):
    __tablename__ = "moedisco_jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), index=True)
    runner: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]]
    output_dir: Mapped[str] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    current_stage: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # runner starts charged to the job itself
    # Relaunches after cluster events (its runner's node or cluster went away, a handover): not the job's fault.
    cluster_restarts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    ray_session: Mapped[str | None] = mapped_column(Text)  # the Ray session its runner was last launched in ...
    launched_at: Mapped[datetime | None]  # ... and when: an open node use from before was a lost runner's
    runner_id: Mapped[str | None] = mapped_column(String(32))  # the lease: which runner holds the job ...
    heartbeat_at: Mapped[datetime | None]  # ... and when it (or its launch) last renewed it
    result: Mapped[dict[str, Any] | None]
    estimate: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The user who submitted the job (not the runner holding its folder: that is `runner_id`).
    owner: Mapped[str] = mapped_column(String(64), default=BOOTSTRAP_ADMIN, server_default=BOOTSTRAP_ADMIN)


class DispatchLeaseRow(Base):
    """Which control plane dispatches (one row): the newest one alive, as Kubernetes controllers elect a leader.
    During a RayService upgrade the new cluster's dispatcher takes it from the old one, which stops launching and
    whose runners hand their jobs over (`service.jobs.dispatcher`)."""

    __tablename__ = "moedisco_dispatch_lease"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str] = mapped_column(String(32))  # the dispatcher's id (one per control-plane process)
    ray_session: Mapped[str | None] = mapped_column(Text)  # its Ray session: runners of other sessions hand over
    # Which dispatcher is newer: the one of the newer Ray session (a newer cluster; a head restarted with GCS fault
    # tolerance keeps its session), then, within one session, the one started later.
    session_born_at: Mapped[datetime]
    born_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]


class UserRow(Base):
    """Someone who submits jobs. `monthly_budget_usd` and `max_queued_jobs` None: no limit of their own
    (MOEDISCO_MAX_QUEUED_JOBS_PER_USER still applies to queued jobs)."""

    __tablename__ = "moedisco_users"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    monthly_budget_usd: Mapped[float | None] = mapped_column(Float)
    max_queued_jobs: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]  # a revoked user's tokens are all refused; their jobs stay


class TokenRow(Base):
    """An API token, stored as the sha256 of its secret (the secret is shown once, when it is created): looking a
    presented token up by its hash is one primary-key read, and the store never holds anything that logs in."""

    __tablename__ = "moedisco_tokens"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    id: Mapped[str] = mapped_column(String(16), unique=True)  # what lists show and revoke names
    user: Mapped[str] = mapped_column(ForeignKey("moedisco_users.name", ondelete="CASCADE"), index=True)
    label: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class _PerStage:
    """Columns of a row kept per stage (and expert) of a job. `key` is `stage_key(stage, expert)`: "submodel/1" for
    an expert's stage, "merge" for the others, so (job_id, key) is a plain primary key on SQLite and PostgreSQL alike
    (a nullable expert column cannot be part of one)."""

    job_id: Mapped[str] = mapped_column(ForeignKey("moedisco_jobs.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    stage: Mapped[str] = mapped_column(Text)
    expert: Mapped[int | None]


class StageRow(_PerStage, Base):
    __tablename__ = "moedisco_stages"

    state: Mapped[str] = mapped_column(String(16))  # running | between_rounds | finished | skipped | failed | stopped
    step: Mapped[int | None]
    total_steps: Mapped[int | None]
    loss: Mapped[float | None] = mapped_column(Float)
    eval_loss: Mapped[float | None] = mapped_column(Float)
    seconds: Mapped[float | None] = mapped_column(Float)
    runner_state: Mapped[str | None] = mapped_column(Text)  # the Ray runner's word for an expert
    summary: Mapped[dict[str, Any] | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    @property
    def peak_memory_gb(self) -> float | None:
        """A training stage's peak memory: from its summary, or while it runs its latest progress record's."""
        return (self.summary or {}).get("peak_memory_gb")


class EventRow(Base):
    __tablename__ = "moedisco_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("moedisco_jobs.id", ondelete="CASCADE"), index=True)
    time: Mapped[datetime] = mapped_column(default=utcnow)
    event: Mapped[str] = mapped_column(Text)
    stage: Mapped[str | None] = mapped_column(Text)
    expert: Mapped[int | None]
    data: Mapped[dict[str, Any] | None]


class StoredCost(_PerStage, Base):
    """A `moedisco.planning.cost.CostRow` as stored (its columns are that row's fields, less the per-round seconds)."""

    __tablename__ = "moedisco_costs"

    tier: Mapped[str] = mapped_column(Text)  # labels and device names come from the spec: no length limit
    device_type: Mapped[str] = mapped_column(Text)
    num_devices: Mapped[int]
    seconds: Mapped[float] = mapped_column(Float)
    device_hours: Mapped[float] = mapped_column(Float)
    price_per_hour: Mapped[float] = mapped_column(Float)
    usd: Mapped[float] = mapped_column(Float)
    simulated: Mapped[bool] = mapped_column(Boolean)
    device: Mapped[str | None] = mapped_column(Text)
    node: Mapped[str | None] = mapped_column(Text)
    lost_steps: Mapped[int] = mapped_column(Integer, default=0)
    lost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    preemptions: Mapped[int] = mapped_column(Integer, default=0)
    priced_at: Mapped[datetime | None]  # the month its dollars count in


class NodeUseRow(Base):
    """A `moedisco.job.events.NodeUse`: work of a job that held resources on a Ray node (the billed cost's input)."""

    __tablename__ = "moedisco_node_uses"

    job_id: Mapped[str] = mapped_column(ForeignKey("moedisco_jobs.id", ondelete="CASCADE"), primary_key=True)
    node: Mapped[str] = mapped_column(Text, primary_key=True, index=True)
    pid: Mapped[int] = mapped_column(Integer, primary_key=True)
    start: Mapped[float] = mapped_column(Float, primary_key=True)
    end: Mapped[float | None] = mapped_column(Float)  # None: still held
    stage: Mapped[str | None] = mapped_column(Text)
    expert: Mapped[int | None]
    round: Mapped[int | None]
    resources: Mapped[dict[str, Any] | None]


class NodeRow(Base):
    """A worker node's life as the runners last saw it (`moedisco.planning.billing.NodeLife`), unix seconds."""

    __tablename__ = "moedisco_nodes"

    node: Mapped[str] = mapped_column(Text, primary_key=True)
    group: Mapped[str] = mapped_column(Text)
    started_at: Mapped[float] = mapped_column(Float)
    requested_at: Mapped[float | None] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float)
    resources: Mapped[dict[str, Any] | None]
    simulated: Mapped[bool] = mapped_column(Boolean, default=False)


# Columns added to a table after its first release: `create_all` never alters an existing table, so a store created
# by an older moedisco gets them here. Same DDL on SQLite and PostgreSQL.
ADDED_COLUMNS = {("moedisco_jobs", "version"): "INTEGER NOT NULL DEFAULT 0",
                 ("moedisco_jobs", "runner_id"): "VARCHAR(32)",
                 ("moedisco_jobs", "heartbeat_at"): "TIMESTAMP WITH TIME ZONE",
                 # Jobs from before users existed belong to the bootstrap admin (MOEDISCO_API_TOKEN).
                 ("moedisco_jobs", "owner"): "VARCHAR(64) NOT NULL DEFAULT 'admin'",
                 ("moedisco_jobs", "cluster_restarts"): "INTEGER NOT NULL DEFAULT 0",
                 ("moedisco_jobs", "ray_session"): "TEXT",
                 ("moedisco_jobs", "launched_at"): "TIMESTAMP WITH TIME ZONE",
                 # Cost rows from before then have none: they count in the month their job was created.
                 ("moedisco_costs", "priced_at"): "TIMESTAMP WITH TIME ZONE",
                 # Work lost to restarts, counted since spot preemptions were: none before.
                 ("moedisco_costs", "lost_steps"): "INTEGER NOT NULL DEFAULT 0",
                 ("moedisco_costs", "lost_usd"): "DOUBLE PRECISION NOT NULL DEFAULT 0",
                 ("moedisco_costs", "preemptions"): "INTEGER NOT NULL DEFAULT 0"}


def _columns(engine: Engine, table: str) -> set[str]:
    return {column["name"] for column in inspect(engine).get_columns(table)}


def init_db(engine: Engine) -> None:
    """Create the missing tables (`create_all`) and the columns in ADDED_COLUMNS; safe on every start."""
    Base.metadata.create_all(engine)
    for (table, column), ddl in ADDED_COLUMNS.items():
        if column in _columns(engine, table):
            continue
        try:
            with engine.begin() as connection:
                connection.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}"))
        except DBAPIError:
            if column not in _columns(engine, table):  # not another process (the API, a job actor) adding it first
                raise
