"""A job's report page: held-out loss curves per stage and cost bars (matplotlib images inlined in HTML).

    GET /v1/jobs/{id}/report

The page is drawn by `service.reporting.report`, loaded (with matplotlib) on the first report, not at start-up; it
uses the job's cost view (`service.reporting.costs`) and its measured baseline, if any.
"""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from moedisco.job.layout import JobPaths
from service.api.deps import JobDep, StoreDep
from service.api.routes.metrics import read_records
from service.reporting.costs import job_cost
from service.schemas import Message
from service.store.billing import bill_inputs

router = APIRouter(prefix="/jobs", tags=["report"])


@router.get("/{job_id}/report", response_class=HTMLResponse, responses={404: {"model": Message}})
def read_report(job: JobDep, store: StoreDep) -> HTMLResponse:
    """An HTML page, live while the job runs (it reloads itself)."""
    from service.reporting.report import render_report  # matplotlib: loaded on the first report, not at start-up

    records = read_records(JobPaths(job.output_dir).metrics)
    found = store.find_baseline(job)
    # The billed curve from the store, which splits shared nodes between jobs as the cost view does (a job's own
    # ledger knows only its own work); a job with no node recorded falls back to its ledger.
    now, baseline = time.time(), found[0] if found is not None else None
    bills = [bill_inputs(store, row) if row is not None else None for row in (job, baseline)]
    spans = [bill.spans(now) if bill is not None and bill.recorded else None for bill in bills]
    return HTMLResponse(render_report(job, store.stages(job.id), records, job_cost(store, job), baseline=baseline,
                                      spans=spans[0], baseline_spans=spans[1]))
