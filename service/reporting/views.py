"""The two views clients poll, `GET /v1/jobs/{id}` and `GET /v1/jobs/{id}/cost`, as JSON bytes: built once per
change of the job and reused while the store says nothing changed.

    views = JobViews(store, max_age_s=2.0)
    body = views.job(job_id)      # bytes of schemas.JobDetail; None when there is no such job
    body = views.cost(job_id)     # bytes of schemas.CostPublic, running stages priced up to this call
    views.job_if_fresh(job_id, owner="ada")   # (None, None) unless ada owns the job: others' jobs do not exist

Every call first reads the job's version (`Store.job_version`, `Store.view_versions`: one primary-key lookup),
which every writer bumps in the transaction of its write, whichever process it runs in; so a view is rebuilt on the
first read after any committed write, and a reader never gets an answer older than the last write committed before
its request. A running job's cost view keeps only its store reads: its running stages are priced at every call.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from service.reporting.costs import CostInputs, cost_inputs, cost_view
from service.schemas import JobDetail, JobPublic, StagePublic
from service.store.models import utcnow
from service.store.store import Store


@dataclass(frozen=True)
class _Entry:
    version: Any
    built: float  # time.monotonic() when built
    body: bytes | None  # the response, when it does not change with the clock
    inputs: CostInputs | None = None  # else what it is computed from


class JobViews:
    """The cache of the polled views. The version is read before a view is built, so a write that lands while it is
    built leaves the kept entry older than the store, and the next read rebuilds it. Entries also expire after
    `max_age_s` (0 turns the cache off), which bounds how long a writer that does not bump versions (a job actor of
    an older moedisco still running through an upgrade) could leave a view stale; at most `max_entries` jobs are
    kept, least recently read first out."""

    def __init__(self, store: Store, max_age_s: float = 2.0, max_entries: int = 1024):
        self.store, self.max_age_s, self.max_entries = store, max_age_s, max_entries
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def _cached(self, key: tuple[str, str], version: Any) -> _Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.version != version or time.monotonic() - entry.built >= self.max_age_s:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def _keep(self, key: tuple[str, str], entry: _Entry) -> _Entry:
        if self.max_age_s > 0:
            with self._lock:
                self._entries[key] = entry
                self._entries.move_to_end(key)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return entry

    # Each view has a fast path, `*_if_fresh` (the version lookup and, when the entry is current, its bytes: no thread
    # hop needed), and `build_*`, which does the store reads; `job` and `cost` are both in one call.

    def job_if_fresh(self, job_id: str, owner: str | None = None) -> tuple[int | None, bytes | None]:
        """(the job's version, its cached view when current); (None, None) when there is no such job (of `owner`,
        when given)."""
        version = self.store.job_version(job_id, owner)
        entry = None if version is None else self._cached(("job", job_id), version)
        return version, None if entry is None else entry.body

    def build_job(self, job_id: str, version: int) -> bytes | None:
        """The job with its stages (schemas.JobDetail) as JSON, read from the store and kept under `version`."""
        built = time.monotonic()
        job = self.store.get_job(job_id)
        if job is None:
            return None
        stages = [StagePublic.model_validate(row) for row in self.store.stages(job_id)]
        detail = JobDetail(**JobPublic.model_validate(job).model_dump(), stages=stages, spec=job.spec,
                           result=job.result)
        return self._keep(("job", job_id), _Entry(version, built, detail.model_dump_json().encode())).body

    def job(self, job_id: str) -> bytes | None:
        version, body = self.job_if_fresh(job_id)
        return body if body is not None or version is None else self.build_job(job_id, version)

    def cost_if_fresh(self, job_id: str, owner: str | None = None) -> tuple[Any, bytes | None]:
        """(the cost view's versions, its bytes when the cached inputs are current); (None, None) when no such job
        (of `owner`, when given)."""
        version = self.store.view_versions(job_id, owner)
        entry = None if version is None else self._cached(("cost", job_id), version)
        return version, None if entry is None else self._cost_body(entry)

    def build_cost(self, job_id: str, version: Any) -> bytes | None:
        """The job's cost (schemas.CostPublic) as JSON, its inputs read from the store and kept under `version`."""
        built = time.monotonic()
        job = self.store.get_job(job_id)
        if job is None:
            return None
        inputs = cost_inputs(self.store, job)
        body = cost_view(inputs, utcnow()).model_dump_json().encode() if inputs.static else None
        return self._cost_body(self._keep(("cost", job_id), _Entry(version, built, body, inputs)))

    def cost(self, job_id: str) -> bytes | None:
        version, body = self.cost_if_fresh(job_id)
        return body if body is not None or version is None else self.build_cost(job_id, version)

    @staticmethod
    def _cost_body(entry: _Entry) -> bytes:
        if entry.body is not None:
            return entry.body
        return cost_view(entry.inputs, utcnow()).model_dump_json().encode()  # running stages priced up to now
