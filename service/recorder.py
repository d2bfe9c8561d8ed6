"""Writes a running job's events into the store as they happen: the runner's `events` callback.

    recorder = EventRecorder(store, job_id, output_dir)
    run_job(spec, events=recorder, should_stop=lambda: store.is_cancel_requested(job_id))

Each event is appended to the events table and folded into its stage row (state, latest step and losses); a
finished stage also copies the runner's OUTPUT/cost.json rows into the cost table, so /cost is live. Each write
bumps the job's version in its transaction, which tells the API's read cache that its views changed.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from service.models import CostRow, EventRow, JobRow, StageRow, stage_key, utcnow
from service.store import Store, bump_version, json_safe

log = logging.getLogger(__name__)

COST_FIELDS = ("tier", "device_type", "num_devices", "seconds", "device_hours", "price_per_hour", "usd",
               "simulated", "device", "node")


class EventRecorder:
    def __init__(self, store: Store, job_id: str, output_dir: Path | str):
        self.store, self.job_id, self.cost_path = store, job_id, Path(output_dir) / "cost.json"
        # The Ray runner may call back from several threads; one writer at a time keeps stage rows consistent.
        self._lock = threading.Lock()

    def __call__(self, event: dict) -> None:
        event = json_safe(event)
        with self._lock, self.store.session() as session, session.begin():
            session.add(EventRow(job_id=self.job_id, event=str(event.get("event")), stage=event.get("stage"),
                                 expert=event.get("expert"), data=event))
            self._apply(session, event)
            bump_version(session, self.job_id)
        if event.get("event") == "stage_finished":
            self.sync_costs()

    def _apply(self, session, event: dict) -> None:
        kind, stage, expert = event.get("event"), event.get("stage"), event.get("expert")
        if not stage:
            return
        key = stage_key(stage, expert)
        row = session.get(StageRow, (self.job_id, key))
        if row is None:
            row = StageRow(job_id=self.job_id, key=key, stage=stage, expert=expert, state="running")
            session.add(row)
        if kind == "stage_started":
            row.state, row.started_at, row.finished_at = "running", utcnow(), None
            session.get(JobRow, self.job_id).current_stage = key
        elif kind == "stage_finished":
            summary = event.get("summary") or {}
            if event.get("round") is not None:  # a stage run in rounds: its time is the sum of its rounds
                rounds = {**(row.summary or {}).get("round_seconds", {}), str(event["round"]): summary.get("seconds")}
                summary = {**summary, "round_seconds": rounds, "seconds": sum(v or 0.0 for v in rounds.values())}
            if summary.get("steps", 0) < summary.get("total_steps", 0):  # a synchronisation round, not the stage
                row.state, row.step, row.summary = "between_rounds", summary["steps"], summary
                row.seconds = summary.get("seconds", row.seconds)
                return
            row.state, row.finished_at, row.summary = "finished", utcnow(), summary
            row.seconds = summary.get("seconds", row.seconds)
            row.eval_loss = summary.get("eval_loss", row.eval_loss)
        elif kind == "stage_skipped":
            row.state = "finished" if row.state == "finished" else "skipped"
        elif kind == "progress":
            _apply_progress(row, event)
        elif kind == "expert_state":
            row.runner_state = str(event.get("state"))

    def sync_costs(self) -> None:
        """Copy OUTPUT/cost.json into the cost table (a resumed stage's row replaces its earlier one)."""
        try:
            ledger = json.loads(self.cost_path.read_text())
        except (OSError, ValueError):  # no priced stage yet
            return
        with self._lock, self.store.session() as session, session.begin():
            for entry in json_safe(ledger.get("stages", [])):
                key = stage_key(entry["stage"], entry.get("expert"))
                row = session.get(CostRow, (self.job_id, key)) or CostRow(
                    job_id=self.job_id, key=key, stage=entry["stage"], expert=entry.get("expert"))
                for field in COST_FIELDS:
                    value = entry.get(field)
                    setattr(row, field, 0 if value is None and field not in ("device", "node") else value)
                session.add(row)
            bump_version(session, self.job_id)


def _apply_progress(row: StageRow, event: dict) -> None:
    row.step = event.get("step", row.step)
    row.total_steps = event.get("total_steps", row.total_steps)
    if event.get("loss") is not None:
        row.loss = event["loss"]
    if event.get("eval_loss") is not None:
        row.eval_loss = event["eval_loss"]
