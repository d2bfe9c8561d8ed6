"""The billed cost in the service: every job's node uses on the worker nodes its runners saw, attributed together.

    record_use(session, job_id, use)             # a NodeUse event, in the recorder's transaction
    record_nodes(session, lives)                 # the nodes the job used, from its runner's OUTPUT/cost.json
    inputs = bill_inputs(store, job)             # the reads: its nodes, every job's uses of them, their jobs
    inputs.spans(now)                            # the arithmetic: this job's BilledSpans (moedisco.planning.billing)
    inputs.billed_usd(compute_usd, now, since)   # what budgets count: the bill after `since`, else compute rows

A runner's own ledger knows only its job's work; here a job's nodes are billed with every use that any job made of
them, so a node two users' jobs shared is split between them by the rule of `moedisco.planning.billing`, and each
user sees only their part. Prices are the operator's (`Store.billing`, MOEDISCO_PRICES_FILE) over the job's spec,
applied when the bill is read, so a price change reaches every job and a spec never sets what its job pays.

A use is opened as work starts and closed as it ends; one a runner could not close (it died, or was replaced after
its lease went stale) is closed here where the job's record says it stopped: at the job's end, or at the start of
the runner that took over.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from moedisco.config.resources import ResourcesConfig
from moedisco.job.events import NodeUse
from moedisco.planning.billing import BilledSpan, NodeLife, Use, accrued_usd, attribute
from service.store.models import JobRow, NodeRow, NodeUseRow
from service.store.store import Store


def record_use(session: Session, job_id: str, use: NodeUse) -> None:
    """Insert the use, or close the one opened earlier (same node, pid and start)."""
    row = session.get(NodeUseRow, (job_id, use.node, use.pid, use.start))
    if row is None:
        row = NodeUseRow(job_id=job_id, node=use.node, pid=use.pid, start=use.start)
        session.add(row)
    if use.end is not None or row.end is None:
        row.end = use.end
    row.stage, row.expert, row.round, row.resources = use.stage, use.expert, use.round, dict(use.resources)


def record_nodes(session: Session, lives: list[dict]) -> None:
    """Merge the lives of nodes a runner saw (`dataclasses.asdict(NodeLife)`) into the node table. Several runners
    report one node, each as it saw it: the earliest request and start, the first group, and an end once seen,
    are kept, so no runner's later, thinner view undoes another's."""
    for life in lives:
        row = session.get(NodeRow, life["node"])
        if row is None:
            row = NodeRow(node=life["node"], group=life["group"], started_at=life["started_at"],
                          resources=life.get("resources") or {}, simulated=bool(life.get("simulated")))
            session.add(row)
        requests = [at for at in (row.requested_at, life.get("requested_at")) if at is not None]
        row.requested_at = min(requests) if requests else None
        row.started_at = min(row.started_at, life["started_at"])
        row.ended_at = row.ended_at if row.ended_at is not None else life.get("ended_at")


def save_nodes(store: Store, lives: list[dict]) -> None:
    """`record_nodes` in a transaction of its own; two runners inserting one new node at once: the second merges."""
    for attempt in range(2):
        try:
            with store.session() as session, session.begin():
                record_nodes(session, lives)
            return
        except IntegrityError:
            if attempt:
                raise


def _life(row: NodeRow) -> NodeLife:
    return NodeLife(node=row.node, group=row.group, started_at=row.started_at, requested_at=row.requested_at,
                    ended_at=row.ended_at, resources=row.resources or {}, simulated=row.simulated)


def _use(row: NodeUseRow) -> Use:
    return Use(job=row.job_id, node=row.node, start=row.start, end=row.end, stage=row.stage, expert=row.expert,
               round=row.round, resources=row.resources or {})


def job_resources(store: Store, job: JobRow) -> ResourcesConfig:
    """What the job is billed at: the operator's prices over its spec's resources (the operator's alone for a
    spec this version cannot read)."""
    spec = job.spec.get("resources", {}) if isinstance(job.spec, dict) else {}
    try:
        return ResourcesConfig.model_validate({**spec, **store.billing})
    except ValidationError:
        return ResourcesConfig.model_validate(store.billing)


def _stopped_at(job: JobRow) -> float | None:
    """Where the job's record says its runner stopped: its end; while it runs, the launch of its current runner
    (a use opened before was a runner's that died, was replaced or handed the job over)."""
    if job.state == "running":
        launched = job.launched_at or job.started_at
        return launched.timestamp() if launched else None
    moment = job.finished_at or job.heartbeat_at or job.started_at
    return moment.timestamp() if moment else None


def _closed(use: Use, job: JobRow | None) -> Use:
    if use.end is not None or job is None:
        return use
    stopped = _stopped_at(job)
    if job.state == "running" and (stopped is None or use.start >= stopped):
        return use  # this runner's: still held
    return replace(use, end=max(use.start, stopped if stopped is not None else use.start))


@dataclass(frozen=True)
class BillInputs:
    """What a job's bill reads from the store: its nodes, every job's uses of them, those jobs' starts."""

    job_id: str
    resources: ResourcesConfig
    lives: list[NodeLife] = field(default_factory=list)
    uses: list[Use] = field(default_factory=list)
    job_starts: dict[str, float] = field(default_factory=dict)

    @property
    def recorded(self) -> bool:
        """Whether a use of the job on a node in the table was recorded; if not (a local run, or a first stage whose
        nodes are not reported yet), its compute rows stand for its bill."""
        known = {life.node for life in self.lives}
        return any(use.job == self.job_id and use.node in known for use in self.uses)

    def spans(self, now: float) -> list[BilledSpan]:
        bill = attribute(self.lives, self.uses, self.resources, now, job_starts=self.job_starts)
        return bill.for_job(self.job_id)

    def billed_usd(self, compute_usd: float, now: float, since: float = float("-inf")) -> float:
        """The bill after `since`; the compute dollars when nothing was recorded."""
        return accrued_usd(self.spans(now), since=since) if self.recorded else compute_usd


def bill_inputs(store: Store, job: JobRow) -> BillInputs:
    with store.session() as session:
        nodes = set(session.scalars(select(NodeUseRow.node).where(NodeUseRow.job_id == job.id)).all())
        if not nodes:
            return BillInputs(job.id, job_resources(store, job))
        lives = [_life(row) for row in session.scalars(select(NodeRow).where(NodeRow.node.in_(nodes))).all()]
        rows = session.scalars(select(NodeUseRow).where(NodeUseRow.node.in_(nodes))).all()
        jobs = {row.id: row for row in session.scalars(select(JobRow).where(
            JobRow.id.in_({row.job_id for row in rows}))).all()}
    uses = [_closed(_use(row), jobs.get(row.job_id)) for row in rows]
    # A job's demand can have launched a node only once it ran; a queued job asks for none.
    starts = {job_id: (row.started_at or row.created_at).timestamp() for job_id, row in jobs.items()}
    return BillInputs(job.id, job_resources(store, job), lives, uses, starts)


def billed_by_owner_and_group(store: Store, now: float) -> dict[tuple[str, str], float]:
    """Billed dollars of every job with node uses, by owner and node group (Prometheus)."""
    with store.session() as session:
        jobs = session.scalars(select(JobRow).where(JobRow.id.in_(select(NodeUseRow.job_id)))).all()
    totals: dict[tuple[str, str], float] = {}
    for job in jobs:
        for span in bill_inputs(store, job).spans(now):
            totals[job.owner, span.group] = totals.get((job.owner, span.group), 0.0) + span.usd
    return totals


__all__ = ["BillInputs", "bill_inputs", "billed_by_owner_and_group", "job_resources", "record_nodes", "record_use",
           "save_nodes"]
