"""Request and response bodies of the API (they are its OpenAPI schema at /docs), and the states of a job.

    JobCreate.model_validate(yaml.safe_load(open("examples/tiny.yaml")))   # the body of POST /v1/jobs
    JobPublic.model_validate(job_row)                                        # a job in responses
    UserCreate(name="ada", monthly_budget_usd=50)                            # the body of POST /v1/users
    job["state"] in TERMINAL_STATES                                          # a client: the job is over

Not in `api/`, because more than the routes speak it: the store keeps a job's state (`service.store`), the
reporting views build these bodies (`service.reporting`), and clients read the states (`moedisco_cli`); it imports
only pydantic and moedisco, so a client reads it without FastAPI or SQLAlchemy.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from moedisco.config.spec import JobSpec
from moedisco.planning.cost import CostRow

# Here rather than in store/models.py so the client (moedisco_cli) knows when a job is over without SQLAlchemy.
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATES = ("succeeded", "failed", "cancelled")
JobState = Literal[JOB_STATES]


class JobCreate(JobSpec):
    """A moedisco job spec (the same document as the YAML that `moedisco run` takes)."""

    output_dir: Path | None = Field(
        None, description="Ignored: the service writes the job to MOEDISCO_DATA_DIR/jobs/<id>/ (`output_dir`).")


class _FromRow(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class JobPublic(_FromRow):
    id: str
    name: str
    method: str
    state: JobState
    runner: str = Field(description="`local` (whole job in one actor) or `ray` (stages placed on the tiers).")
    owner: str = Field(description="The user who submitted the job (`admin`: MOEDISCO_API_TOKEN).")
    reason: str | None = Field(None, description="Why the job failed or was cancelled.")
    cancel_requested: bool
    current_stage: str | None = Field(None, description="Last stage started, e.g. `submodel/1`.")
    attempts: int = Field(description="Runner starts charged to the job: the first, and one more each time its "
                                      "runner was lost to the job itself (a crash, killed for memory).")
    cluster_restarts: int = Field(0, description="Relaunches after cluster events, not counted in `attempts`: a "
                                                 "node or the runner's cluster lost, a handover during an upgrade.")
    output_dir: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class StagePublic(_FromRow):
    stage: str
    expert: int | None
    state: str = Field(
        description="running, between_rounds (till the next round), finished, skipped (done before), failed, stopped.")
    step: int | None = Field(None, description="Latest logged training step.")
    total_steps: int | None
    loss: float | None = Field(None, description="Latest training loss.")
    eval_loss: float | None = Field(None, description="Latest held-out loss.")
    seconds: float | None
    peak_memory_gb: float | None = Field(
        None, description="Peak memory so far, GB (CUDA: max allocated; CPU: RSS high-water mark above the start).")
    runner_state: str | None = Field(None, description="The Ray runner's state of this expert.")
    started_at: datetime | None
    finished_at: datetime | None


class JobDetail(JobPublic):
    stages: list[StagePublic]
    spec: dict[str, Any] = Field(description="The spec as run, with the job's real output_dir.")
    result: dict[str, Any] | None = Field(None, description="The runner's summary once the job succeeded.")


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int = Field(description="Jobs matching the filter, over all pages.")
    offset: int
    limit: int


class CostRowPublic(CostRow):
    """A priced stage: the runner's ledger row (`moedisco.planning.cost.CostRow`), and whether it is final."""

    final: bool = Field(description="False for a stage still running: its dollars so far, at the tier's price.")


class BaselinePublic(BaseModel):
    kind: Literal["measured", "estimate"] = Field(
        description="`measured`: a full-parameter job on the same data and model; `estimate`: the FLOP model.")
    usd: float
    job_id: str | None = Field(None, description="The measured baseline job.")


class BilledRowPublic(BaseModel):
    """A job's node time for one stage (and expert) on one node group, by kind (`moedisco.planning.billing`)."""

    stage: str | None = Field(description="The stage of the work the node time belongs to.")
    expert: int | None
    group: str = Field(description="The node group whose price applies.")
    seconds: float = Field(description="Node-seconds billed to this job.")
    usd: float
    simulated: bool = Field(description="The nodes' GPUs were logical (the local simulated cluster).")
    busy_seconds: float = Field(description="The job's work held the node (its share of it).")
    boot_seconds: float = Field(description="From the autoscaler's request to the first use (boot, image pull).")
    between_seconds: float = Field(description="Idle between two uses by this job (synchronisation barriers).")
    idle_seconds: float = Field(description="Idle after its last use, until scale-down (the idle timeout).")
    unclaimed_seconds: float = Field(0.0, description="Always 0 for a job: the cluster's own time is nobody's.")
    nodes: list[str] = Field(description="The Ray node ids.")


class BilledPublic(BaseModel):
    """What the cloud bills for the job: the node-seconds its work caused, at the price of each node's group."""

    basis: Literal["nodes", "compute"] = Field(
        description="`nodes`: from the nodes' lives and the job's uses of them; `compute`: no node was recorded "
        "(a local run on one machine), so the compute total stands for it.")
    total_usd: float = Field(description="What budgets and `max_cost_usd` count.")
    rows: list[BilledRowPublic]
    seconds: float = Field(description="Node-seconds billed, in all.")
    seconds_by_kind: dict[str, float] = Field(description="busy, boot, between, idle (and unclaimed: 0).")
    usd_by_kind: dict[str, float]
    usd_by_group: dict[str, float]
    simulated: bool


class CostPublic(BaseModel):
    """A job's cost in two views: `billed` (node-hours at group prices: the invoice, and what budgets use) and
    compute (`stages`, `total_usd`: device-hours of each stage's work at its tier's price)."""

    job_id: str
    owner: str = Field(description="The user who submitted the job.")
    state: JobState
    live: bool = Field(description="True while the job runs: totals include running stages so far.")
    billed: BilledPublic
    billed_usd: float = Field(description="`billed.total_usd`: what the cloud bills, and what budgets count.")
    stages: list[CostRowPublic] = Field(description="The compute view: a row per stage (and expert).")
    by_tier_usd: dict[str, float]
    total_usd: float = Field(description="The compute view's total: device-hours of the work at tier prices.")
    lost_usd: float = Field(
        0.0, description="Of `total_usd`, what paid for steps trained again after a restart (rows' `lost_usd`).")
    simulated: bool
    prices_per_hour: dict[str, float]
    baseline: BaselinePublic | None
    savings_pct: float | None = Field(
        None, description="100 x (baseline - this job) / baseline: billed dollars against a measured baseline's "
        "billed dollars; FLOP estimates against an estimated one.")
    compute_savings_pct: float | None = Field(
        None, description="The same in the compute view, against a measured baseline.")
    savings_basis: Literal["measured", "estimate"] | None = Field(
        None, description="`estimate`: the FLOP estimates of both methods, never wall time against a FLOP model.")
    estimate_usd: float | None = Field(
        None, description="This job's own FLOP-model estimate: what an estimated baseline is compared with.")
    note: str | None = None


class MetricsPublic(BaseModel):
    data: list[dict[str, Any]] = Field(description="Records of OUTPUT/metrics.jsonl, oldest first.")
    count: int
    offset: int
    limit: int


class EvaluationPublic(BaseModel):
    """OUTPUT/evaluation.json of a job's `evaluate` stage (`moedisco.stages.evaluate.evaluate_models`)."""

    job_id: str
    tasks: list[str] = Field(description="lm-eval task names, as the spec's `evaluate.tasks`.")
    limit: int | None = Field(description="Examples per task scored (null: all).")
    models: dict[str, dict[str, dict[str, Any]]] = Field(
        description="Model label (the job's method, or `baseline`) -> task -> metric -> value.")
    baseline_job_id: str | None = Field(description="The measured full-parameter job whose scores are `baseline`.")
    baseline: dict[str, dict[str, dict[str, Any]]] | None = Field(
        description="That baseline job's own evaluation, when it ran one.")


class ExpertOriginPublic(BaseModel):
    """Where one expert of a model came from, as the model records it (`moedisco.models.experts`)."""

    expert: int = Field(description="The expert's index in the model.")
    job: str | None = Field(None, description="Name of the job that trained it.")
    output_dir: str | None = Field(None, description="That job's folder.")
    data: str | None = Field(None, description="The corpus it was trained on.")
    cluster: int | None = Field(None, description="The cluster of that corpus it was trained on (its submodel).")
    domain: str | None = Field(None, description="The cluster's declared domain, where the record has one.")
    method: str | None = Field(None, description="How it was trained: `moe_disco`, or `extend` (added later).")
    clustering: str | None = Field(None, description="How that corpus was clustered (`cluster.method`).")
    base: str | None = Field(None, description="An added expert: the model it was added to.")
    origin: str | None = Field(None, description="An expert moedisco did not train: the checkpoint it came with.")


class DomainLossPublic(BaseModel):
    """Held-out loss on one domain of a model's lineage, before and after an extension or a retirement."""

    domain: str = Field(description="`<job name>/<declared domain or cluster k>`: one cluster of one job's corpus.")
    before: float | None = Field(description="The base model's loss (null: not measured, e.g. a new domain).")
    after: float | None = Field(description="This job's model's loss.")
    change: float | None = Field(description="after - before (null where either is missing).")


class ExpertsPublic(BaseModel):
    """A finished model's experts and, for an extension or a retirement, the loss per domain before and after."""

    job_id: str | None = Field(None, description="The job; null for a model folder (`moedisco experts --local`).")
    method: str | None = Field(None, description="The job's method; null for a model folder.")
    base: str | None = Field(None, description="`extend.base` / `retire.base`: the model extended or retired from.")
    experts: list[ExpertOriginPublic] = Field(description="One per expert of the final model, in order.")
    retired: list[ExpertOriginPublic] = Field([], description="A retirement: the experts it removed (base indices).")
    domains: list[DomainLossPublic] = Field([], description="An extension or a retirement: loss per domain.")
    domains_stage: str | None = Field(None, description="The stage summary `domains` is from: `finetune` (or "
                                      "`merge`, before it) of an extension, `retire`.")


class ArtifactPublic(BaseModel):
    path: str = Field(description="Relative to the job's output_dir; download at /v1/jobs/{id}/artifacts/{path}.")
    size: int
    modified: datetime


class ArtifactsPublic(BaseModel):
    data: list[ArtifactPublic]
    count: int


class Message(BaseModel):
    detail: str


# Lower case, digits and . _ -: a name is a Prometheus label value and a path segment, and must read the same.
USER_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
TOKEN_ID_PATTERN = r"^[0-9a-f]{12}$"
JOB_ID_PATTERN = r"^[0-9a-f]{12}$"  # uuid4 hex, cut
UserName = Annotated[str, StringConstraints(pattern=USER_NAME_PATTERN)]
Dollars = Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)]


class UserLimits(BaseModel):
    """A user's own limits; unset (null) means none."""

    model_config = ConfigDict(extra="forbid")

    monthly_budget_usd: Dollars | None = Field(
        None, description="Dollars per calendar month (UTC): checked at submission, and before each stage.")
    max_queued_jobs: int | None = Field(
        None, ge=0, le=100_000, description="Jobs queued at once (else MOEDISCO_MAX_QUEUED_JOBS_PER_USER).")


class UserCreate(UserLimits):
    name: UserName = Field(description="Lower case letters, digits, `.`, `_`, `-`; at most 64 characters.")
    is_admin: bool = Field(False, description="Admins manage users and see every job.")


class UserAccount(UserLimits):
    """A user, with this month's spend."""

    name: str
    is_admin: bool
    created_at: datetime | None = Field(description="None for the bootstrap admin (MOEDISCO_API_TOKEN).")
    revoked_at: datetime | None = Field(None, description="Set once revoked: every token of the user is refused.")
    month_spend_usd: float = Field(description="Dollars this user's jobs were billed this calendar month (UTC): "
                                   "node-hours at group prices; a job with no node recorded, its priced stages.")
    budget_left_usd: float | None = Field(None, description="monthly_budget_usd - month_spend_usd; null: no budget.")
    queued_jobs: int


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str | None = Field(None, max_length=64, pattern=r"^[^\x00-\x1f]*$",  # PostgreSQL refuses NUL
                              description="What the token is for, e.g. `laptop`.")


class TokenPublic(_FromRow):
    id: str = Field(description="Names the token in lists and to revoke it; not the secret.")
    user: str
    label: str | None
    created_at: datetime
    revoked_at: datetime | None


class TokenCreated(TokenPublic):
    token: str = Field(description="The secret, shown only in this response: send it as `Authorization: Bearer`.")


class FilePublic(BaseModel):
    """An uploaded corpus file in the caller's area."""

    name: str = Field(description="The file's name, unique among the caller's uploads.")
    path: str = Field(description="What a spec's data.train or data.eval names it by (relative to the data folder).")
    size: int = Field(description="Bytes on the server.")
    modified: datetime = Field(description="When it was uploaded.")



class ClusterPublic(BaseModel):
    """The cluster's worker nodes now, by node group; counts only, so no tenant learns whose work holds them."""

    connected: bool = Field(description="Whether the service has a Ray cluster to ask (else the counts are empty).")
    nodes: dict[str, int] = Field(description="Alive worker nodes by node group (`ray.io/node-group`).")
    launching: dict[str, int] = Field(description="Nodes asked of the autoscaler and not up yet, by node group.")
    autoscaling: bool = Field(description="Whether an autoscaler has reported to the cluster.")
