"""Runs a whole job in this process, stage after stage, with cost ledger, events, budget and report.

    summary = run_job(load_spec("examples/tiny.yaml"), events=print)

`events` receives dicts such as {"event": "stage_started", "stage": "submodel", "expert": 1} and every training
progress record, which is what the service stores and the CLI draws as progress bars.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import yaml
from pydantic import ValidationError

from moedisco import pipeline as stages
from moedisco.config import JobSpec, TierConfig, upgrade_saved_spec
from moedisco.cost import CostLedger
from moedisco.metrics import MetricsWriter
from moedisco.pipeline import BudgetExceeded, Events, JobPaths
from moedisco.report import write_report
from moedisco.train import TrainHooks

log = logging.getLogger(__name__)

# Sections whose change makes earlier artifacts meaningless: resuming with them changed would mix two jobs.
IDENTITY_SECTIONS = ("method", "data", "tokenizer", "embed", "cluster", "model", "branch", "seed")
MOE_DISCO_ONLY = ("embed", "cluster", "branch")  # a full-parameter baseline never reads these


def _differences(saved: Any, current: Any, path: str) -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        return [diff for key in sorted(set(saved) | set(current), key=str)
                for diff in _differences(saved.get(key), current.get(key), f"{path}.{key}")]
    return [] if saved == current else [f"{path} ({saved!r} there, {current!r} here)"]


def check_same_job(spec: JobSpec, paths: JobPaths) -> None:
    """Refuse to resume a job folder with a spec that would make its finished stages mean something else."""
    saved_path = paths.root / "spec.yaml"
    if not saved_path.is_file():
        return
    saved = upgrade_saved_spec(yaml.safe_load(saved_path.read_text()))
    try:  # fields newer than the saved spec get their defaults
        saved = JobSpec.model_validate(saved).model_dump(mode="json")
    except ValidationError:
        pass
    current = spec.model_dump(mode="json")
    moe_disco = spec.method == "moe_disco"
    sections = [key for key in IDENTITY_SECTIONS if moe_disco or key not in MOE_DISCO_ONLY]
    changed = [diff for key in sections for diff in _differences(saved.get(key), current.get(key), key)]
    if moe_disco and spec.branch.sync_rounds > 1:  # round ends are fractions of the submodel steps
        changed += _differences(saved.get("submodel", {}).get("steps"), spec.submodel.steps, "submodel.steps")
    if changed:
        raise ValueError(f"output_dir {paths.root} holds a job with different {'; '.join(changed)}. Set them "
                         "back to resume it, or use a new output_dir to start over")


class LocalRunner:
    """One job, in process. Stages are methods so the Ray runner can reuse the bookkeeping around them."""

    def __init__(self, spec: JobSpec, events: Events | None = None, progress: bool = True,
                 should_stop: Callable[[], bool] | None = None):
        self.spec, self.paths = spec, JobPaths(spec.output_dir)
        self.events = events or (lambda event: None)
        self.progress, self.should_stop = progress, should_stop
        self.metrics = MetricsWriter(self.paths.metrics)
        self.ledger = CostLedger(self.paths.cost, spec.resources)

    def hooks(self, **extra) -> TrainHooks:
        return TrainHooks(on_progress=lambda record: self.events({"event": "progress", **record}),
                          should_stop=self.should_stop, extra=extra)

    def stage(self, name: str, tier: TierConfig | None, work: Callable[[], dict], expert: int | None = None,
              round_index: int | None = None) -> dict:
        """Run `work` unless the stage is done; record its cost and mark it done.

        `round_index` is set for the stages that repeat per synchronisation round (submodels, sync); a round's
        cost is added to the stage's row (`CostLedger.record`), and events carry `round`.
        """
        marker = self.marker(name, expert, round_index)
        ids = {"stage": name, "expert": expert, **({} if round_index is None else {"round": round_index})}
        if stages.is_done(self.paths, marker):
            self.events({"event": "stage_skipped", **ids})
            return stages.stage_result(self.paths, marker)
        self.check_budget(name)
        self.events({"event": "stage_started", **ids})
        started = time.perf_counter()
        summary = work()
        seconds = summary.get("seconds", time.perf_counter() - started)
        if tier is not None:
            device = summary.get("device", "cpu")
            self.ledger.record(name, tier, seconds, device=device, expert=expert, node=summary.get("node"),
                               num_devices=summary.get("num_nodes"), round_index=round_index)
        self.events({"event": "stage_finished", **ids, "summary": summary})
        return stages.mark_done(self.paths, marker, summary)

    def marker(self, name: str, expert: int | None, round_index: int | None) -> str:
        if name == "submodel":
            return stages.submodel_marker(self.spec, expert, self.spec.branch.sync_rounds - 1
                                          if round_index is None else round_index)
        base = name if expert is None else f"{name}_{expert}"
        return base if round_index is None else f"{base}_{round_index}"

    def after_sync(self, round_index: int) -> None:
        """Once a sync is marked done its average lives in the checkpoints; the copy kept for re-running it goes
        (a backbone per round: gigabytes at real scale)."""
        self.paths.sync_average(round_index).unlink(missing_ok=True)

    def check_budget(self, stage: str) -> None:
        """Stop before a stage when the money spent, plus what a stage of the same kind cost last time
        (the previous submodel, or its previous round), would exceed `max_cost_usd`."""
        budget = self.spec.max_cost_usd
        if budget is None:
            return
        spent, projected = self.ledger.total_usd(), self.ledger.last_usd(stage)
        if spent + projected > budget or spent >= budget:
            raise BudgetExceeded(f"stopped before stage {stage!r}: ${spent:.4f} spent + ${projected:.4f} projected "
                                 f"exceeds the ${budget:.4f} budget (max_cost_usd)")

    def run(self) -> dict:
        spec, paths = self.spec, self.paths
        check_same_job(spec, paths)
        spec.save(paths.root / "spec.yaml")
        cheap, dear = spec.resources.submodel_tier, spec.resources.finetune_tier
        self.stage("prepare", None, lambda: stages.stage_prepare(spec, paths))
        if spec.method == "full_parameter":
            self.stage("source", None, lambda: stages.stage_source(spec, paths))
            self.stage("full_parameter", dear, lambda: stages.stage_full_parameter(
                spec, paths, self.metrics, self.hooks(), self.progress))
        else:
            self.run_moe_disco(cheap, dear)
        write_report(paths.metrics, paths.cost, paths.report, title=spec.name)
        return {"output_dir": str(paths.root), "final": str(paths.final), "cost": self.ledger.summary()}

    def run_moe_disco(self, cheap: TierConfig, dear: TierConfig) -> None:
        spec, paths = self.spec, self.paths
        self.stage("embed", cheap, lambda: stages.stage_embed(spec, paths, self.metrics))
        self.stage("cluster", cheap, lambda: stages.stage_cluster(spec, paths, self.metrics))
        self.stage("source", None, lambda: stages.stage_source(spec, paths))
        if spec.branch.warmup_steps > 0:
            self.stage("warmup", cheap, lambda: stages.stage_warmup(spec, paths, self.metrics, self.hooks(),
                                                                    self.progress))
        rounds = spec.branch.sync_rounds
        for round_index in range(rounds):
            if round_index > 0:
                self.stage("sync", cheap, lambda r=round_index - 1: stages.stage_sync(spec, paths, r, self.metrics),
                           round_index=round_index - 1)
                self.after_sync(round_index - 1)
            for expert in range(spec.model.num_experts):
                self.stage("submodel", cheap, lambda k=expert, r=round_index: stages.stage_submodel(
                    spec, paths, k, self.metrics, self.hooks(), self.progress, r), expert=expert,
                    round_index=round_index if rounds > 1 else None)
        self.stage("merge", cheap, lambda: stages.stage_merge(spec, paths, self.metrics))
        self.stage("finetune", dear, lambda: stages.stage_finetune(
            spec, paths, self.metrics, self.hooks(), self.progress))


def run_job(spec: JobSpec, events: Events | None = None, progress: bool = True,
            should_stop: Callable[[], bool] | None = None) -> dict:
    return LocalRunner(spec, events, progress, should_stop).run()


__all__ = ["BudgetExceeded", "LocalRunner", "run_job"]
