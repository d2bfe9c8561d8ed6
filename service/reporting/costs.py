"""A job's cost view: its billed node time, its priced stages, the running stages so far, the baseline, the savings.

    view = job_cost(store, job)      # -> schemas.CostPublic
    view.billed_usd, view.total_usd, view.baseline.kind, view.savings_pct
    inputs = cost_inputs(store, job); cost_view(inputs, utcnow())   # the same, in two steps: reads, then arithmetic

Finished stages are the runner's own ledger rows (OUTPUT/cost.json, copied into the store as each stage ends); while
a job runs, each running stage adds a provisional row (`final: false`), its wall time so far at its tier's price.
The billed view is the job's nodes' time split with every job that used them (`service.store.billing`), up to
the moment of the request; a job with no node recorded (a local run) is billed its compute total. The baseline is a
measured full-parameter job on the same data and model when the store has one, billed the same way, else moedisco's
FLOP-model estimate, marked `estimate`. `cost_inputs` does every read and `cost_view` only arithmetic, so the API
can keep the inputs while the store says nothing changed (`service.reporting.views`) and still price running stages
up to the moment of each request.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pydantic import ValidationError

from moedisco.config.resources import ResourcesConfig
from moedisco.job.registry import STAGE_NAMES, pipeline_order, tier_of
from moedisco.planning.cost import CostRow, billed_view, price_row
from service.schemas import BaselinePublic, BilledPublic, CostPublic, CostRowPublic
from service.store.billing import BillInputs, bill_inputs
from service.store.models import JobRow, StageRow, stage_key, utcnow
from service.store.store import Store


def _public(row: CostRow, final: bool) -> CostRowPublic:
    return CostRowPublic(**row.model_dump(), final=final)


def _live_row(stage: StageRow, resources: ResourcesConfig, now: datetime) -> CostRowPublic | None:
    """A running stage's wall time so far at its tier's price (`price_row`, as the ledger does)."""
    if stage.stage not in STAGE_NAMES or stage.started_at is None:
        return None
    tier = tier_of(resources, stage.stage)
    seconds = max(0.0, (now - stage.started_at).total_seconds())
    return _public(price_row(stage.stage, tier, resources.prices, seconds, expert=stage.expert), final=False)


def _pipeline_order(row: CostRowPublic) -> tuple[int, int]:
    return pipeline_order(row.stage), row.expert or 0


def _resources(job: JobRow) -> ResourcesConfig | None:
    try:  # stored in full when submitted, so it validates unless an older moedisco wrote it
        return ResourcesConfig.model_validate(job.spec.get("resources", {}))
    except ValidationError:
        return None


@dataclass(frozen=True)
class CostInputs:
    """What a job's cost view reads from the store."""

    job: JobRow
    resources: ResourcesConfig | None  # the job's tiers and prices (None: a spec this version cannot read)
    priced: list[CostRowPublic]  # the runner's ledger rows
    running: list[StageRow]  # stages running, priced by their time so far (only while the job runs)
    measured_baseline: tuple[JobRow, float] | None
    bill: BillInputs  # the job's nodes and every use of them
    baseline_bill: BillInputs | None  # the measured baseline's

    @property
    def static(self) -> bool:
        """True when the view does not change with the clock (no running stage is priced by its time so far, no
        node of the job is alive or held)."""
        bills = [self.bill] + ([self.baseline_bill] if self.baseline_bill else [])
        return not self.running and not any(life.ended_at is None for bill in bills for life in bill.lives) \
            and not any(use.end is None for bill in bills for use in bill.uses)


def cost_inputs(store: Store, job: JobRow) -> CostInputs:
    priced = store.cost_rows(job.id)
    running = [s for s in store.stages(job.id) if s.state == "running"] if job.state == "running" else []
    # A stage both priced and running is in a later synchronisation round: its priced rounds are not final yet.
    busy = {stage.key for stage in running}
    baseline = store.find_baseline(job)
    return CostInputs(job, _resources(job), [_public(row, final=stage_key(*row.key) not in busy) for row in priced],
                      running, baseline, bill_inputs(store, job),
                      bill_inputs(store, baseline[0]) if baseline is not None else None)


def _rows(inputs: CostInputs, now: datetime) -> list[CostRowPublic]:
    live = [] if inputs.resources is None else [_live_row(stage, inputs.resources, now) for stage in inputs.running]
    return sorted(inputs.priced + [row for row in live if row is not None], key=_pipeline_order)


def _savings(baseline_usd: float, usd: float) -> float | None:
    return round(100.0 * (baseline_usd - usd) / baseline_usd, 2) if baseline_usd > 0 else None


def _baseline(inputs: CostInputs, billed_usd: float, now: float
              ) -> tuple[BaselinePublic | None, float | None, str | None]:
    """(baseline, savings %, basis). A measured baseline is billed as this job is; an estimated one is compared
    with this job's estimate, not its bill: a CPU run priced at GPU rates and a GPU FLOP model are not the same
    currency."""
    job, found = inputs.job, inputs.measured_baseline
    if found is not None:
        baseline_job, compute_usd = found
        usd = inputs.baseline_bill.billed_usd(compute_usd, now)
        return BaselinePublic(kind="measured", usd=usd, job_id=baseline_job.id), _savings(usd, billed_usd), "measured"
    estimate = job.estimate or {}
    if job.method != "full_parameter" and estimate.get("full_parameter_usd") is not None:
        usd = estimate["full_parameter_usd"]
        return BaselinePublic(kind="estimate", usd=usd), _savings(usd, estimate.get("total_usd", 0.0)), "estimate"
    return None, None, None


def _note(job: JobRow, baseline: BaselinePublic | None) -> str | None:
    if job.method == "full_parameter":
        return "this job is a full-parameter baseline"
    if baseline is None:
        return "no baseline yet: the estimate is computed when the job starts"
    if baseline.kind == "estimate":
        return "no measured full-parameter job on the same data and model; baseline and savings are FLOP estimates"
    return None


def cost_view(inputs: CostInputs, now: datetime) -> CostPublic:
    job, rows, clock = inputs.job, _rows(inputs, now), now.timestamp()
    by_tier: dict[str, float] = {}
    for row in rows:
        by_tier[row.tier] = by_tier.get(row.tier, 0.0) + row.usd
    total, simulated = sum(row.usd for row in rows), any(row.simulated for row in rows)
    billed = BilledPublic(**billed_view(inputs.bill.spans(clock) if inputs.bill.recorded else [], total, simulated))
    baseline, savings, basis = _baseline(inputs, billed.total_usd, clock)
    compute_savings = _savings(inputs.measured_baseline[1], total) if inputs.measured_baseline else None
    return CostPublic(job_id=job.id, owner=job.owner, state=job.state, live=job.state == "running", billed=billed,
                      billed_usd=billed.total_usd, stages=rows, by_tier_usd=by_tier, total_usd=total,
                      lost_usd=sum(row.lost_usd for row in rows), simulated=simulated,
                      prices_per_hour=dict(inputs.resources.prices) if inputs.resources else {}, baseline=baseline,
                      savings_pct=savings, compute_savings_pct=compute_savings, savings_basis=basis,
                      note=_note(job, baseline), estimate_usd=(job.estimate or {}).get("total_usd"))


def job_cost(store: Store, job: JobRow) -> CostPublic:
    return cost_view(cost_inputs(store, job), utcnow())
