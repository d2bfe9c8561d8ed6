"""What a user may queue, checked when a job is submitted or resumed: the per-user limit on queued jobs and the
monthly budget (the running job's runner checks the budget again before each stage: `service.jobs.executor`).

    check_queue_limit(users, settings, caller)                    # 429 when the caller has too many jobs queued
    estimate = check_monthly_budget(users, caller, spec_dict)     # 403 when the estimate exceeds what is left

The bootstrap admin (MOEDISCO_API_TOKEN) has no user row, hence no limits. Two submissions racing past the queue
limit at the same instant can both pass it: the limit keeps a queue fair, it is not an accounting boundary.
"""

from __future__ import annotations

from fastapi import HTTPException, status
from fastapi.exceptions import RequestValidationError

from moedisco.config.spec import JobSpec
from service.api.deps import Caller
from service.core.config import Settings
from service.store.users import Users


def check_queue_limit(users: Users, settings: Settings, caller: Caller) -> None:
    user = users.get_user(caller.name)
    if user is None:
        return
    limit = settings.max_queued_jobs_per_user if user.max_queued_jobs is None else user.max_queued_jobs
    queued = users.count_queued(caller.name)
    if limit is not None and queued >= limit:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS,
                            f"user {caller.name!r} already has {queued} queued jobs (limit {limit}): wait for one "
                            "to start, or cancel one")


def estimate_cost(spec: dict) -> dict:
    """moedisco's FLOP-model estimate of the job (loads torch and transformers on first use, builds no weights)."""
    from moedisco.planning.estimate import cost_estimate

    try:
        return cost_estimate(JobSpec.model_validate(spec))
    except Exception as error:  # a model config transformers refuses: say so, never a 500
        raise RequestValidationError([{"type": "value_error", "loc": ("body", "model"), "input": None,
                                       "msg": f"cannot estimate this job's cost ({type(error).__name__}: "
                                              f"{str(error)[:200]})"}]) from None


def _over_budget(caller: Caller, left: float, why: str) -> HTTPException:
    return HTTPException(status.HTTP_403_FORBIDDEN, f"monthly budget of user {caller.name!r}: "
                                                    f"${max(left, 0.0):.4f} left this month, {why}")


def check_monthly_budget(users: Users, caller: Caller, spec: dict | None) -> dict | None:
    """Refuse a job whose estimate exceeds what its owner may still spend this month; returns the estimate
    (None when the caller has no budget, so the API loads no model code). `spec` None: a resumed job, which
    needs only some budget left (its runner checks each stage)."""
    left = users.budget_left(caller.name)
    if left is None:
        return None
    if left <= 0:
        raise _over_budget(caller, left, "nothing can run")
    if spec is None:
        return None
    estimate = estimate_cost(spec)
    if estimate["total_usd"] > left:
        raise _over_budget(caller, left, f"this job is estimated at ${estimate['total_usd']:.4f}")
    return estimate
