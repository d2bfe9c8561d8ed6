"""The billed cost in the service: every job's node uses on the worker nodes its runners saw, attributed together.

    record_use(session, job_id, use)        # a NodeUse event, in the recorder's transaction
    record_nodes(session, lives)            # the nodes in a runner's OUTPUT/cost.json ("usage")
    spans = job_bill(store, job, now)       # this job's BilledSpans (moedisco.planning.billing)
    inputs = bill_inputs(store, job); inputs.spans(now)   # the same in two steps: the reads, then the arithmetic
    billed_usd(store, job, since, now)      # the part of its bill after `since` (a month's budget)

A runner's own ledger knows only its job's work; here a job's nodes are billed with every use that any job made of
them, so a node two users' jobs shared is split between them by the rule of `moedisco.planning.billing`, and each
user sees only their part. The prices are those of the job's spec, which the service sets from its operator's price
table when the job is submitted (`service.jobs.specs`), never the user's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from moedisco.config.resources import ResourcesConfig
from moedisco.job.events import NodeUse
from moedisco.planning.billing import BilledSpan, NodeLife, Use, attribute
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
    """Upsert the nodes a runner saw (`dataclasses.asdict(NodeLife)`); an end once seen stays."""
    for life in lives:
        row = session.get(NodeRow, life["node"]) or NodeRow(node=life["node"])
        row.group, row.started_at, row.requested_at = life["group"], life["started_at"], life.get("requested_at")
        row.ended_at = life.get("ended_at") if life.get("ended_at") is not None else row.ended_at
        row.resources, row.simulated = life.get("resources") or {}, bool(life.get("simulated"))
        session.add(row)


def _life(row: NodeRow) -> NodeLife:
    return NodeLife(node=row.node, group=row.group, started_at=row.started_at, requested_at=row.requested_at,
                    ended_at=row.ended_at, resources=row.resources or {}, simulated=row.simulated)


def _use(row: NodeUseRow) -> Use:
    return Use(job=row.job_id, node=row.node, start=row.start, end=row.end, stage=row.stage, expert=row.expert,
               round=row.round, resources=row.resources or {})


def job_resources(job: JobRow) -> ResourcesConfig:
    """The prices the job is billed at (its stored spec's; the defaults for a spec this version cannot read)."""
    try:
        return ResourcesConfig.model_validate(job.spec.get("resources", {}))
    except ValidationError:
        return ResourcesConfig()


def has_uses(store: Store, job_id: str) -> bool:
    with store.session() as session:
        return session.scalar(select(NodeUseRow.node).where(NodeUseRow.job_id == job_id).limit(1)) is not None


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
        """Whether any node use of the job was recorded (none: a local run, billed its compute rows)."""
        return any(use.job == self.job_id for use in self.uses)

    def spans(self, now: float) -> list[BilledSpan]:
        bill = attribute(self.lives, self.uses, self.resources, now, job_starts=self.job_starts)
        return bill.for_job(self.job_id)


def bill_inputs(store: Store, job: JobRow) -> BillInputs:
    with store.session() as session:
        nodes = set(session.scalars(select(NodeUseRow.node).where(NodeUseRow.job_id == job.id)).all())
        if not nodes:
            return BillInputs(job.id, job_resources(job))
        lives = [_life(row) for row in session.scalars(select(NodeRow).where(NodeRow.node.in_(nodes))).all()]
        uses = [_use(row) for row in session.scalars(select(NodeUseRow).where(NodeUseRow.node.in_(nodes))).all()]
        starts = session.execute(select(JobRow.id, JobRow.started_at, JobRow.created_at)
                                 .where(JobRow.id.in_({use.job for use in uses}))).all()
    # A job's demand can have launched a node only once it ran; a queued job asks for none.
    job_starts = {job_id: (started or created).timestamp() for job_id, started, created in starts}
    return BillInputs(job.id, job_resources(job), lives, uses, job_starts)


def job_bill(store: Store, job: JobRow, now: float) -> list[BilledSpan]:
    """The job's stretches of node time: its nodes' lives, split with every job that used them."""
    return bill_inputs(store, job).spans(now)


def billed_by_owner_and_group(store: Store, now: float) -> dict[tuple[str, str], float]:
    """Billed dollars of every job with node uses, by owner and node group (Prometheus)."""
    with store.session() as session:
        jobs = session.scalars(select(JobRow).where(JobRow.id.in_(select(NodeUseRow.job_id)))).all()
    totals: dict[tuple[str, str], float] = {}
    for job in jobs:
        for span in job_bill(store, job, now):
            totals[job.owner, span.group] = totals.get((job.owner, span.group), 0.0) + span.usd
    return totals


def usd_after(spans: list[BilledSpan], since: float) -> float:
    """The dollars of `spans` accrued after `since` (a span across it counts in proportion)."""
    total = 0.0
    for span in spans:
        if span.end <= since:
            continue
        length = span.end - span.start
        total += span.usd if span.start >= since or length <= 0 else span.usd * (span.end - since) / length
    return total


def billed_usd(store: Store, job: JobRow, since: float, now: float) -> float:
    return usd_after(job_bill(store, job, now), since)


__all__ = ["BillInputs", "bill_inputs", "billed_by_owner_and_group", "billed_usd", "has_uses", "job_bill", "job_resources", "record_nodes", "record_use", "usd_after"]
