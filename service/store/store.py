"""The job store: every read and write of the tables, shared by the API, the dispatcher and the job actors.

    store = Store("sqlite:////tmp/moedisco.db")
    job = store.create_job("a1b2c3", spec_dict, runner="local", owner="ada")
    rows, count = store.list_jobs(states=["queued"], offset=0, limit=20, owner="ada")   # owner None: everyone's
    claimed = store.claim_next_queued()            # queued -> running, atomically (no job starts twice)
    store.hold_dispatch("plane-1", "session_x", session_born_at, born_at, stale_before)  # True: it dispatches

State changes are conditional UPDATEs (`... WHERE state = 'queued'`), so two processes racing on one job cannot
both win, on SQLite or PostgreSQL. Every write to a job, its stages or its costs also bumps the job's `version`
in the same transaction (`bump_version`), which is what `view_versions` reads to validate cached views.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from moedisco.planning.cost import CostRow
from service.core.config import read_prices
from service.core.db import make_engine, session_factory
from service.schemas import TERMINAL_STATES
from service.store.models import (
    BOOTSTRAP_ADMIN,
    DispatchLeaseRow,
    EventRow,
    JobRow,
    StageRow,
    StoredCost,
    init_db,
    utcnow,
)

DISPATCH_LEASE = "dispatcher"  # the dispatch lease's one row
# A full-parameter job is the measured baseline of a MoE-DisCo job when it trained on the same data and model.
BASELINE_MATCH = ("data", "tokenizer", "model", "seed")


def json_safe(value: Any) -> Any:
    """NaN and infinities become None: they are not JSON, and PostgreSQL and JSON responses refuse them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# The version queries run on every read of a polled view: built once, on the tables (no ORM), with a bound job id.
_JOBS = JobRow.__table__
_BASELINES = _JOBS.alias("baselines")
_IS_BASELINE = (_BASELINES.c.state == "succeeded", _BASELINES.c.method == "full_parameter")
JOB_VERSION = select(_JOBS.c.version).where(_JOBS.c.id == bindparam("job_id"))
VIEW_VERSIONS = select(
    _JOBS.c.version,
    select(func.count()).select_from(_BASELINES).where(*_IS_BASELINE).scalar_subquery(),
    select(func.coalesce(func.sum(_BASELINES.c.version), 0)).where(*_IS_BASELINE).scalar_subquery(),
).where(_JOBS.c.id == bindparam("job_id"))
# The same, for a caller who may only see their own jobs: another user's job reads as no job at all.
OWN_JOB = _JOBS.c.owner == bindparam("owner")
OWN_VERSION, OWN_VIEW_VERSIONS = JOB_VERSION.where(OWN_JOB), VIEW_VERSIONS.where(OWN_JOB)


def bump_version(session: Session, job_id: str) -> None:
    """Mark the job as changed; call inside the transaction that changes it, its stages or its cost rows."""
    session.execute(update(JobRow).where(JobRow.id == job_id).values(version=JobRow.version + 1))


class Store:
    """`billing`: the operator's price keys of `resources` (`service.core.config.Settings.billing`), which every
    job's bill is read at (`service.store.billing`); unset: moedisco's defaults."""

    def __init__(self, url: str, billing: dict | None = None):
        self.url = url
        self.billing = billing if billing is not None else read_prices(None)
        self.engine = make_engine(url)
        init_db(self.engine)
        self.session: type[Session] = session_factory(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # --- jobs ---------------------------------------------------------------------------------------------------

    def create_job(self, job_id: str, spec: dict, runner: str, owner: str = BOOTSTRAP_ADMIN) -> JobRow:
        job = JobRow(id=job_id, name=spec["name"], method=spec["method"], state="queued", runner=runner,
                     spec=json_safe(spec), output_dir=spec["output_dir"], cancel_requested=False, attempts=0,
                     owner=owner)
        with self.session() as session, session.begin():
            session.add(job)
        return job

    def get_job(self, job_id: str) -> JobRow | None:
        with self.session() as session:
            return session.get(JobRow, job_id)

    def list_jobs(self, states: Iterable[str] | None, offset: int, limit: int,
                  owner: str | None = None) -> tuple[list[JobRow], int]:
        query = select(JobRow)
        if states:
            query = query.where(JobRow.state.in_(list(states)))
        if owner is not None:
            query = query.where(JobRow.owner == owner)
        with self.session() as session:
            count = session.scalar(select(func.count()).select_from(query.subquery()))
            rows = session.scalars(query.order_by(JobRow.created_at.desc(), JobRow.id.desc())
                                   .offset(offset).limit(limit)).all()
        return list(rows), count or 0

    def stages(self, job_id: str) -> list[StageRow]:
        with self.session() as session:
            rows = session.scalars(select(StageRow).where(StageRow.job_id == job_id)).all()
        return sorted(rows, key=lambda r: (r.started_at is None, r.started_at or utcnow(), r.key))

    def events(self, job_id: str, event: str | None = None) -> list[EventRow]:
        query = select(EventRow).where(EventRow.job_id == job_id)
        if event is not None:
            query = query.where(EventRow.event == event)
        with self.session() as session:
            return list(session.scalars(query.order_by(EventRow.id)).all())

    def cost_rows(self, job_id: str) -> list[CostRow]:
        """The job's priced stages, as the runner's ledger wrote them."""
        with self.session() as session:
            stored = session.scalars(select(StoredCost).where(StoredCost.job_id == job_id)).all()
            return [CostRow.model_validate(row, from_attributes=True) for row in stored]

    # --- queue and lifecycle ------------------------------------------------------------------------------------

    def _update_job(self, job_id: str, where: Iterable, **values) -> bool:
        with self.session() as session, session.begin():
            result = session.execute(update(JobRow).where(JobRow.id == job_id, *where)
                                     .values(updated_at=utcnow(), version=JobRow.version + 1, **values))
        return result.rowcount == 1

    def jobs_in_state(self, state: str) -> list[JobRow]:
        with self.session() as session:
            return list(session.scalars(select(JobRow).where(JobRow.state == state)
                                        .order_by(JobRow.created_at, JobRow.id)).all())

    def count_in_state(self, state: str) -> int:
        with self.session() as session:
            return session.scalar(select(func.count()).where(JobRow.state == state)) or 0

    def claim_next_queued(self) -> JobRow | None:
        """Move the oldest queued job to running; None when the queue is empty."""
        for job in self.jobs_in_state("queued"):
            if self._update_job(job.id, [JobRow.state == "queued"], state="running", started_at=utcnow()):
                return self.get_job(job.id)
        return None

    def begin_attempt(self, job_id: str, stale_before: datetime | None = None, ray_session: str | None = None,
                      counted: bool = True) -> bool:
        """Count a launch of the job's runner in `ray_session` and reserve its lease (renewed now, held by no runner
        yet), unless a runner renewed it since `stale_before`; True when this caller may launch (one of several
        dispatchers). `counted` False: a relaunch after a cluster event, counted in `cluster_restarts` instead of
        `attempts` (which only the job's own losses use up)."""
        lease_free = [JobRow.state == "running"]
        if stale_before is not None:
            lease_free.append(or_(JobRow.heartbeat_at.is_(None), JobRow.heartbeat_at < stale_before))
        count = {"attempts": JobRow.attempts + 1} if counted else {"cluster_restarts": JobRow.cluster_restarts + 1}
        now = utcnow()
        return self._update_job(job_id, lease_free, runner_id=None, heartbeat_at=now, ray_session=ray_session,
                                launched_at=now, **count)

    # --- the runner's lease -------------------------------------------------------------------------------------

    def claim_lease(self, job_id: str, runner_id: str, stale_before: datetime) -> bool:
        """Take the running job's lease for `runner_id`: free when reserved by its launch, or stale."""
        free = or_(JobRow.runner_id.is_(None), JobRow.heartbeat_at.is_(None), JobRow.heartbeat_at < stale_before)
        return self._renew(job_id, [JobRow.state == "running", free], runner_id=runner_id)

    def renew_lease(self, job_id: str, runner_id: str) -> bool:
        """Renew the lease; False when another runner holds it now (this one was taken for dead)."""
        return self._renew(job_id, [JobRow.runner_id == runner_id], runner_id=runner_id)

    def _renew(self, job_id: str, where: list, **values) -> bool:
        # No version bump: a heartbeat changes nothing a view shows.
        with self.session() as session, session.begin():
            result = session.execute(update(JobRow).where(JobRow.id == job_id, *where)
                                     .values(heartbeat_at=utcnow(), **values))
        return result.rowcount == 1

    def release_lease(self, job_id: str, runner_id: str) -> bool:
        """Give the job up at once (a handover to another control plane's cluster): its lease reads as stale, so
        the dispatcher holding the dispatch lease relaunches it at its next pass."""
        return self._update_job(job_id, [JobRow.runner_id == runner_id], runner_id=None, heartbeat_at=None)

    @staticmethod
    def lease_is_fresh(job: JobRow, stale_before: datetime) -> bool:
        return job.heartbeat_at is not None and job.heartbeat_at >= stale_before

    # --- the dispatch lease: one control plane launches at a time ----------------------------------------------

    def hold_dispatch(self, holder: str, ray_session: str | None, session_born_at: datetime, born_at: datetime,
                      stale_before: datetime) -> bool:
        """Take or renew the dispatch lease for dispatcher `holder` (of `ray_session`, which started at
        `session_born_at`; the dispatcher at `born_at`): its own, one of an older control plane (a newer cluster
        takes over at once, as an upgrade wants; a process of the old cluster restarting meanwhile does not take it
        back), or one nobody renewed since `stale_before`. False while a newer one holds it."""
        values = {"holder": holder, "ray_session": ray_session, "session_born_at": session_born_at,
                  "born_at": born_at, "heartbeat_at": utcnow()}
        lease = DispatchLeaseRow
        older = or_(lease.session_born_at < session_born_at,
                    and_(lease.session_born_at == session_born_at, lease.born_at < born_at))
        takeable = or_(lease.holder == holder, older, lease.heartbeat_at < stale_before)
        with self.session() as session, session.begin():
            taken = session.execute(update(lease).where(lease.name == DISPATCH_LEASE, takeable)
                                    .values(**values)).rowcount == 1
            if taken or session.get(lease, DISPATCH_LEASE) is not None:
                return taken
        try:
            with self.session() as session, session.begin():
                session.add(lease(name=DISPATCH_LEASE, **values))
        except IntegrityError:  # another dispatcher created it first: the next pass compares ages
            return False
        return True

    def dispatch_holder(self) -> DispatchLeaseRow | None:
        with self.session() as session:
            return session.get(DispatchLeaseRow, DISPATCH_LEASE)

    def finish(self, job_id: str, state: str, reason: str | None = None, result: dict | None = None,
               runner_id: str | None = None, stale_before: datetime | None = None) -> bool:
        """Enter a terminal state, unless the job already is in one (the first word is kept); only while
        `runner_id` holds its lease (a runner's own outcome), or while its lease is older than `stale_before`
        (the dispatcher giving up on a runner that is gone)."""
        assert state in TERMINAL_STATES, state
        where = [JobRow.state.not_in(TERMINAL_STATES)]
        if runner_id is not None:
            where.append(JobRow.runner_id == runner_id)
        if stale_before is not None:
            where.append(or_(JobRow.heartbeat_at.is_(None), JobRow.heartbeat_at < stale_before))
        done = self._update_job(job_id, where, state=state, reason=reason, result=json_safe(result),
                                finished_at=utcnow())
        if done and state != "succeeded":
            self._close_open_stages(job_id, "stopped" if state == "cancelled" else "failed")
        return done

    def _close_open_stages(self, job_id: str, stage_state: str) -> None:
        with self.session() as session, session.begin():
            session.execute(update(StageRow).where(StageRow.job_id == job_id, StageRow.state == "running")
                            .values(state=stage_state, finished_at=utcnow()))
            bump_version(session, job_id)

    def request_cancel(self, job_id: str) -> JobRow | None:
        """A queued job is cancelled at once; a running one is asked to stop at its next stage boundary."""
        self._update_job(job_id, [JobRow.state == "queued"], state="cancelled", cancel_requested=True,
                         reason="cancelled before it started", finished_at=utcnow())
        self._update_job(job_id, [JobRow.state == "running"], cancel_requested=True)
        return self.get_job(job_id)

    def resume_job(self, job_id: str) -> bool:
        """Queue a failed or cancelled job again on its output_dir, where its runner skips what is done and
        resumes an interrupted stage from its checkpoint; False for a job in another state."""
        return self._update_job(job_id, [JobRow.state.in_(("failed", "cancelled"))], state="queued", reason=None,
                                cancel_requested=False, attempts=0, cluster_restarts=0, finished_at=None,
                                result=None, runner_id=None, heartbeat_at=None)

    def is_cancel_requested(self, job_id: str) -> bool:
        with self.session() as session:
            return bool(session.scalar(select(JobRow.cancel_requested).where(JobRow.id == job_id)))

    def set_estimate(self, job_id: str, estimate: dict) -> None:
        self._update_job(job_id, [], estimate=json_safe(estimate))

    # --- cost, baseline and Prometheus aggregates ----------------------------------------------------------------

    def find_baseline(self, job: JobRow) -> tuple[JobRow, float] | None:
        """The newest succeeded full-parameter job of the same owner on the same data and model, with its dollars:
        another user's job, its id, scores, curve and dollars, is not this one's to see."""
        if job.method == "full_parameter":
            return None
        wanted = {key: job.spec.get(key) for key in BASELINE_MATCH}
        with self.session() as session:
            candidates = session.scalars(select(JobRow).where(JobRow.state == "succeeded",
                                                              JobRow.method == "full_parameter",
                                                              JobRow.owner == job.owner)
                                         .order_by(JobRow.created_at.desc(), JobRow.id.desc())).all()
        for candidate in candidates:
            if all(candidate.spec.get(key) == value for key, value in wanted.items()):
                return candidate, sum(row.usd for row in self.cost_rows(candidate.id))
        return None

    # --- versions of the read views -----------------------------------------------------------------------------

    def job_version(self, job_id: str, owner: str | None = None) -> int | None:
        """The job's version (None when there is no such job, or `owner` is given and does not own it): one
        primary-key lookup."""
        query, params = _versions_query(JOB_VERSION, OWN_VERSION, job_id, owner)
        with self.engine.connect() as connection:
            return connection.execute(query, params).scalar()

    def view_versions(self, job_id: str, owner: str | None = None) -> tuple[int, int, int] | None:
        """(the job's version, and the number and summed versions of the succeeded full-parameter jobs), or None
        when there is no such job. One primary-key lookup and one indexed count, in one round trip.

        A job's detail changes exactly when its version does; its cost view also when a possible measured baseline
        appears or changes, which the last two numbers capture (both only grow, so no change goes unnoticed)."""
        query, params = _versions_query(VIEW_VERSIONS, OWN_VIEW_VERSIONS, job_id, owner)
        with self.engine.connect() as connection:
            row = connection.execute(query, params).first()
        return None if row is None else (int(row[0]), int(row[1]), int(row[2]))

    def count_by_owner_and_state(self) -> dict[tuple[str, str], int]:
        with self.session() as session:
            counts = select(JobRow.owner, JobRow.state, func.count()).group_by(JobRow.owner, JobRow.state)
            return {(owner, state): count for owner, state, count in session.execute(counts).all()}

    def finished_stage_seconds(self) -> list[tuple[str, float]]:
        with self.session() as session:
            return list(session.execute(select(StageRow.stage, StageRow.seconds).where(
                StageRow.state == "finished", StageRow.seconds.is_not(None))).all())

    def usd_by_owner_and_tier(self) -> dict[tuple[str, str], float]:
        with self.session() as session:
            totals = (select(JobRow.owner, StoredCost.tier, func.sum(StoredCost.usd))
                      .join(JobRow, JobRow.id == StoredCost.job_id).group_by(JobRow.owner, StoredCost.tier))
            return {(owner, tier): usd for owner, tier, usd in session.execute(totals).all()}


def _versions_query(everyone, own, job_id: str, owner: str | None) -> tuple:
    return (everyone, {"job_id": job_id}) if owner is None else (own, {"job_id": job_id, "owner": owner})
