"""Writes a running job's events into the store as they happen: the runner's `events` callback.

    recorder = EventRecorder(store, job_id, output_dir)
    run_job(spec, events=recorder, should_stop=lambda: store.is_cancel_requested(job_id))

Each event is appended to the events table and folded into its stage row (state, latest step and losses); a
finished stage also copies the runner's OUTPUT/cost.json rows into the cost table, and the worker nodes it saw into
the nodes table, so /cost is live. A `NodeUse` (work holding a node, the billed cost's input) goes to the node-use
table only: it is bookkeeping, not history a user reads. Each write bumps the job's version in its transaction,
which tells the API's read cache that its views changed.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from moedisco.job.events import (
    Event,
    ExpertState,
    NodeUse,
    Progress,
    StageFinished,
    StageSkipped,
    StageStarted,
    parse_event,
)
from moedisco.job.layout import JobPaths
from moedisco.planning.cost import CostRow
from service.store.billing import record_use, save_nodes
from service.store.models import EventRow, JobRow, StageRow, StoredCost, stage_key, utcnow
from service.store.store import Store, bump_version, json_safe

log = logging.getLogger(__name__)

STORED_COST_FIELDS = [name for name in CostRow.model_fields if name in StoredCost.__table__.columns]


class EventRecorder:
    def __init__(self, store: Store, job_id: str, output_dir: Path | str):
        self.store, self.job_id, self.cost_path = store, job_id, JobPaths(output_dir).cost
        # The Ray runner may call back from several threads; one writer at a time keeps stage rows consistent.
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        data = json_safe(event.model_dump(mode="json"))
        event = parse_event(data)  # as stored: NaN and infinite losses are None
        with self._lock, self.store.session() as session, session.begin():
            if isinstance(event, NodeUse):
                record_use(session, self.job_id, event)
            else:
                session.add(EventRow(job_id=self.job_id, event=event.event, stage=event.stage, expert=event.expert,
                                     data=data))
                self._apply(session, event)
            bump_version(session, self.job_id)
        if isinstance(event, StageFinished):
            self.sync_costs()

    def _apply(self, session, event: Event) -> None:
        if not event.stage:
            return
        key = stage_key(event.stage, event.expert)
        row = session.get(StageRow, (self.job_id, key))
        if row is None:
            row = StageRow(job_id=self.job_id, key=key, stage=event.stage, expert=event.expert, state="running")
            session.add(row)
        if isinstance(event, StageStarted):
            row.state, row.started_at, row.finished_at = "running", utcnow(), None
            session.get(JobRow, self.job_id).current_stage = key
        elif isinstance(event, StageFinished):
            _apply_finished(row, event)
        elif isinstance(event, StageSkipped):
            row.state = "finished" if row.state == "finished" else "skipped"
        elif isinstance(event, Progress):
            _apply_progress(row, event)
        elif isinstance(event, ExpertState):
            row.runner_state = event.state

    def sync_costs(self) -> None:
        """Copy OUTPUT/cost.json into the cost table (a resumed stage's row replaces its earlier one)."""
        try:
            ledger = json.loads(self.cost_path.read_text())
        except (OSError, ValueError):  # no priced stage yet
            return
        with self._lock, self.store.session() as session, session.begin():
            for entry in ledger.get("stages", []):
                row = CostRow.model_validate(json_safe(entry))
                key = stage_key(row.stage, row.expert)
                stored = session.get(StoredCost, (self.job_id, key)) or StoredCost(job_id=self.job_id, key=key)
                if stored.usd != row.usd:  # new or re-priced: its dollars count in this month's budget
                    stored.priced_at = utcnow()
                for name in STORED_COST_FIELDS:
                    setattr(stored, name, getattr(row, name))
                session.add(stored)
            bump_version(session, self.job_id)
        # The nodes this job used (the ledger lists every worker node its runner saw), merged with what other
        # jobs' runners said of them.
        usage = ledger.get("usage", {})
        used = {use["node"] for use in usage.get("uses", [])}
        save_nodes(self.store, [life for life in usage.get("nodes", []) if life["node"] in used])


def _apply_finished(row: StageRow, event: StageFinished) -> None:
    summary = event.summary
    if event.round is not None:  # a stage run in rounds: its time is the sum of its rounds
        rounds = {**(row.summary or {}).get("round_seconds", {}), str(event.round): summary.get("seconds")}
        summary = {**summary, "round_seconds": rounds, "seconds": sum(v or 0.0 for v in rounds.values())}
    row.summary, row.seconds = summary, summary.get("seconds", row.seconds)
    if not event.final:  # a synchronisation round ended; the stage goes on in the next one
        row.state, row.step = "between_rounds", summary.get("steps", row.step)
        return
    row.state, row.finished_at = "finished", utcnow()
    row.eval_loss = summary.get("eval_loss", row.eval_loss)


def _apply_progress(row: StageRow, event: Progress) -> None:
    row.step = event.step
    row.total_steps = event.total_steps if event.total_steps is not None else row.total_steps
    if event.loss is not None:
        row.loss = event.loss
    if event.eval_loss is not None:
        row.eval_loss = event.eval_loss
    peak = getattr(event, "peak_memory_gb", None)  # a metrics record's extra field
    if peak is not None:
        row.summary = {**(row.summary or {}), "peak_memory_gb": peak}
