"""Runs a job: its plan (`moedisco.job.registry.plan`) through an executor, with markers, events, budget, cost
and report.

    summary = run_job(load_spec("examples/tiny.yaml"), events=print)            # every stage in this process
    summary = JobRunner(spec, RayExecutor(), events=store_events).run()         # ray_cluster.orchestrate

`JobRunner` does a job's bookkeeping, the same whichever executor runs the stages: it skips tasks whose marker
exists, stops before a task when the job is cancelled or its budget would be exceeded, announces and records each
task (`moedisco.job.events`), prices it into the ledger and leaves its marker. An `Executor` only runs tasks: the
`LocalExecutor` here calls each stage's function in this process; the Ray one places it on its tier.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import yaml
from pydantic import ValidationError

from moedisco.config.loading import absolute_paths, upgrade_saved_spec, with_pretrained_arch
from moedisco.config.spec import JobSpec
from moedisco.job.events import (
    Events,
    JobCancelledEvent,
    NodeUse,
    StageFinished,
    StageSkipped,
    StageStarted,
    ignore,
    progress_event,
)
from moedisco.job.layout import ClaimLost, JobPaths, check_claim, claim, is_done, mark_done, stage_result
from moedisco.job.metrics import MetricsWriter
from moedisco.job.registry import STAGE, Task, plan, tier_of
from moedisco.models.experts import with_checkpoint_model
from moedisco.planning.billing import NodeLife
from moedisco.planning.cost import CostLedger
from moedisco.planning.estimate import rerun_estimate
from moedisco.planning.memory_plan import resolve_memory
from moedisco.runner.execute import run_stage
from moedisco.runner.report import write_report
from moedisco.stages.stage_run import StageRun
from moedisco.training.loop import Preempted, StopRequested, TrainHooks
from moedisco.training.preemption import PreemptionNotice

log = logging.getLogger(__name__)

# Sections whose change makes earlier artifacts meaningless: resuming with them changed would mix two jobs.
IDENTITY_SECTIONS = ("method", "data", "tokenizer", "embed", "cluster", "model", "branch", "seed", "extend", "retire")
MOE_DISCO_ONLY = ("embed", "cluster", "branch")  # a full-parameter baseline never reads these


def _differences(saved: Any, current: Any, path: str) -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        return [diff for key in sorted(set(saved) | set(current), key=str)
                for diff in _differences(saved.get(key), current.get(key), f"{path}.{key}")]
    return [] if saved == current else [f"{path} ({saved!r} there, {current!r} here)"]


def check_same_job(spec: JobSpec, paths: JobPaths) -> None:
    """Refuse to resume a job folder with a spec that would make its finished stages mean something else."""
    saved_path = paths.spec
    if not saved_path.is_file():
        return
    saved = upgrade_saved_spec(yaml.safe_load(saved_path.read_text()))
    try:  # fields newer than the saved spec get their defaults; an older version saved relative paths as given;
        # one that predates learning `model.arch` from a pretrained checkpoint gets it as the current spec does
        saved = with_pretrained_arch(absolute_paths(JobSpec.model_validate(saved))).model_dump(mode="json")
    except (ValidationError, ValueError):
        pass
    current = spec.model_dump(mode="json")
    moe_disco = spec.method in ("moe_disco", "extend")  # the methods that embed, cluster and branch
    sections = [key for key in IDENTITY_SECTIONS if moe_disco or key not in MOE_DISCO_ONLY]
    changed = [diff for key in sections for diff in _differences(saved.get(key), current.get(key), key)]
    if moe_disco and spec.branch.sync_rounds > 1:  # round ends are fractions of the submodel steps
        changed += _differences(saved.get("submodel", {}).get("steps"), spec.submodel.steps, "submodel.steps")
    if changed:
        raise ValueError(f"output_dir {paths.root} holds a job with different {'; '.join(changed)}. Set them "
                         "back to resume it, or use a new output_dir to start over")


class BudgetExceeded(RuntimeError):
    """The job stopped at a stage boundary because its next stage would exceed `max_cost_usd`."""


class JobCancelled(StopRequested):
    """The job was cancelled: its running stages were stopped; finished stages and checkpoints are kept."""




@dataclass
class JobContext:
    """What an executor gets of the job it runs."""

    spec: JobSpec
    paths: JobPaths
    metrics: MetricsWriter
    events: Events
    should_stop: Callable[[], bool] | None = None
    runner_id: str | None = None  # the runner's id: its stages check the folder's claim file before they write
    may_write: Callable[[], None] = lambda: None  # raises `ClaimLost` once another runner claimed the folder

    def stage_run(self, task: Task, hooks: TrainHooks | None = None, progress: bool = False) -> StageRun:
        return StageRun(self.spec, self.paths, self.metrics, task, hooks, progress)


Started = Callable[[Task], None]


class Executor(Protocol):
    """Runs the tasks of a job; the `JobRunner` keeps the books."""

    # Whether it shards a training stage over several devices (Ray: `memory_plan.stage_devices`): the memory planner
    # plans each stage for the devices it will really train on.
    shards: bool

    def open(self, job: JobContext) -> None:
        """Before the job's first task."""

    def run(self, tasks: list[Task], started: Started) -> Iterator[tuple[Task, dict]]:
        """Run `tasks` (one group of the plan: they may run at once), calling `started(task)` as each starts,
        and yield each with its summary, in order."""

    def done(self, task: Task) -> None:
        """`task` is done (recorded now, or found done on a re-run): drop what only it needed."""

    def node_lives(self) -> list[NodeLife]:
        """The worker nodes of the cluster it runs on, as last seen (for the billed cost); none: one machine."""

    def close(self) -> None:
        """After the job, also after an error or a cancel: nothing of the job may keep running."""


class LocalExecutor:
    """Every task in this process, one after another."""

    shards = False  # one device per stage

    def __init__(self, progress: bool = True):
        self.progress = progress

    def open(self, job: JobContext) -> None:
        self.job, self.notice = job, PreemptionNotice()
        # SIGTERM (a spot node's notice) checkpoints the running stage at its step and raises `train.Preempted`;
        # re-running the job resumes there.
        self.sigterm = contextlib.ExitStack()
        self.sigterm.enter_context(self.notice.on_sigterm())

    def run(self, tasks: list[Task], started: Started) -> Iterator[tuple[Task, dict]]:
        for task in tasks:
            if self.notice():  # came between two stages
                raise Preempted(f"{self.notice.reason}: stopped before {task.stage}", None)
            started(task)
            # A training loop polls the notice and checkpoints the step it reached; any other stage is interrupted.
            guard = contextlib.nullcontext() if STAGE[task.stage].trained else self.notice.interrupting(
                lambda why, stage=task.stage: Preempted(
                    f"{why} during {stage}; a re-run redoes only what it had not finished", None))
            with guard:
                summary = run_stage(self.job.stage_run(task, self.hooks(), self.progress))
            yield task, summary

    def hooks(self) -> TrainHooks:
        return TrainHooks(on_progress=lambda record: self.job.events(progress_event(record)),
                          should_stop=self.job.should_stop, before_write=self.job.may_write, preempted=self.notice)

    def done(self, task: Task) -> None:
        pass

    def node_lives(self) -> list[NodeLife]:
        return []  # this machine alone: the job is billed its compute rows

    def close(self) -> None:
        self.sigterm.close()


BudgetLeft = Callable[[], float | None]


class JobRunner:
    """`runner_id`: this runner's id, when several may be started on one job folder (the service's relaunches): it
    claims the folder, and stops with `ClaimLost` before any write once another runner has claimed it since.

    `budget_left`: dollars that may still be spent beyond what is spent so far, asked before every stage (None:
    no limit), for a budget wider than the job's `max_cost_usd`, e.g. the service's monthly budget per user,
    which other jobs spend too. What this job spent is already counted in it."""

    def __init__(self, spec: JobSpec, executor: Executor, events: Events | None = None,
                 should_stop: Callable[[], bool] | None = None, runner_id: str | None = None,
                 budget_left: BudgetLeft | None = None):
        # Every process the job reaches reads the same folders, and trains with the memory measures planned here
        # (`memory: auto`), which the saved spec then holds; a job that fits no device is refused before it starts.
        # An output_dir on object storage comes down first (a resume on a fresh machine): the memory plan keeps
        # the measures its checkpoints were trained with, and the ledger what the job spent so far.
        spec = with_checkpoint_model(absolute_paths(spec))  # an extension's or retirement's model: the base's
        paths = JobPaths(spec.output_dir)
        paths.pull()
        spec = resolve_memory(spec, sharded=executor.shards)
        self.runner_id, self.user_should_stop, self.user_events = runner_id, should_stop, events or ignore
        self.budget_left, self.replaced = budget_left, False
        self.job = JobContext(spec, paths, MetricsWriter(paths.metrics), self.emit, self.should_stop, runner_id,
                              self.check_claim)
        self.ledger = CostLedger(paths.cost, spec.resources)  # before the job's first event
        self.executor = executor
        self.plan = plan(spec)
        self.last_task = {task.key: task for group in self.plan for task in group}  # a stage's last round
        self.started_at: dict[Task, float] = {}

    @property
    def spec(self) -> JobSpec:
        return self.job.spec

    @property
    def paths(self) -> JobPaths:
        return self.job.paths

    def run(self) -> dict:
        try:
            self.executor.open(self.job)
            try:
                check_same_job(self.spec, self.paths)
                if self.runner_id is not None:
                    claim(self.paths, self.runner_id)
                self.spec.save(self.paths.spec)
                self.ledger.begin()
                for group in self.plan:
                    self.run_group(group)
            finally:
                self.executor.close()
        except BaseException as error:
            self.push_after_stop(error)
            raise
        write_report(self.paths.metrics, self.paths.cost, self.paths.report, title=self.spec.name)
        self.paths.push()
        evaluation = stage_result(self.paths, "evaluate").get("scores") if is_done(self.paths, "evaluate") else None
        cost = self.ledger.summary()
        return {"output_dir": str(self.paths.root), "final": str(self.paths.final), "cost": cost,
                "evaluation": evaluation, "versus_rerun": self.versus_rerun(cost["total_usd"])}

    def versus_rerun(self, spent: float) -> dict | None:
        """An extension against re-running its first job (`rerun_estimate`); None, logged, when that job can no
        longer be priced (its spec or pretrained model moved since): the extension itself is done either way."""
        try:
            return rerun_estimate(self.spec, spent)
        except Exception as error:  # noqa: BLE001 - a comparison, never a reason to fail a finished job
            log.warning("%s: no comparison with re-running its first job (%s)", self.spec.name, error)
            return None

    def push_after_stop(self, error: BaseException) -> None:
        """A stop (preemption, cancel, budget) or a failure: an output_dir on object storage also gets what was
        written since the last finished stage (a stage's checkpoints, metrics), so a resume elsewhere starts
        there. Not once another runner owns the folder (it writes there now); and a failing push is logged, not
        raised, so the error that stopped the job is the one seen."""
        if self.paths.remote is None or self.replaced or isinstance(error, ClaimLost):
            return
        try:
            self.paths.push()
        except Exception as push_error:  # noqa: BLE001 - the original error matters more
            log.warning("could not push %s to %s after the job stopped: %s", self.paths.root, self.paths.remote,
                        push_error)

    def run_group(self, group: list[Task]) -> None:
        todo = []
        for task in group:
            if is_done(self.paths, task.marker):
                self.emit(StageSkipped(**task.ids))
                self.done(task)
            else:
                todo.append(task)
        for number, (task, summary) in enumerate(self.executor.run(todo, self.start) if todo else (), start=1):
            self.finish(task, summary)
            if number < len(todo):  # the others of the group may still be stopped (they run at once on Ray)
                self.check_budget(task.stage)

    def start(self, task: Task) -> None:
        """Called by the executor as `task` starts: the last moment to stop before it."""
        self.check_cancelled(task)
        self.check_budget(task.stage)
        self.started_at[task] = time.perf_counter()
        self.emit(StageStarted(**task.ids))

    def finish(self, task: Task, summary: dict) -> None:
        self.check_claim()
        seconds = summary.get("seconds", time.perf_counter() - self.started_at.pop(task, time.perf_counter()))
        self.ledger.record(task.stage, tier_of(self.spec.resources, task.stage), seconds,
                           device=summary.get("device", "cpu"), expert=task.expert, node=summary.get("node"),
                           num_devices=summary.get("num_nodes"), round_index=task.round, work=summary)
        self.ledger.add_uses(summary.get("node_uses", []))
        self.ledger.set_nodes(self.executor.node_lives())
        # A trained stage run in rounds goes on in its next round; anything else ends with its task.
        final = self.last_task[task.key] == task or not STAGE[task.stage].trained
        self.emit(StageFinished(**task.ids, summary=summary, final=final))
        mark_done(self.paths, task.marker, summary)
        self.done(task)
        self.paths.push()  # an output_dir on object storage holds every finished stage

    def done(self, task: Task) -> None:
        if task.stage == "sync":
            # Once a sync is marked done its average lives in the checkpoints; the copy kept for re-running it
            # goes (a backbone per round: gigabytes at real scale).
            self.paths.sync_average(task.round).unlink(missing_ok=True)
            if task.round > 0:  # the outer optimizer's state: the next round's sync only reads this round's
                self.paths.outer_state(task.round - 1).unlink(missing_ok=True)
        self.executor.done(task)

    def emit(self, event) -> None:
        """The user's callback, until this runner was replaced: then the job's events are the new runner's. A
        closed node use goes into the ledger as it comes, so that work which never finished (a failed or cancelled
        attempt) is billed too."""
        if isinstance(event, NodeUse) and event.end is not None:
            self.ledger.add_uses([event.model_dump(mode="json")], save=False)
        if not self.replaced:
            self.user_events(event)

    def check_claim(self) -> None:
        self.fenced(lambda: check_claim(self.paths, self.runner_id))

    def should_stop(self) -> bool:
        """What the executor and the training loops poll: the user's stop flag; a lost folder (or the user's
        `should_stop` raising `ClaimLost`: the service's lease was taken) raises `ClaimLost`."""
        self.check_claim()
        return bool(self.user_should_stop is not None and self.fenced(self.user_should_stop))

    def fenced(self, check: Callable):
        """`check()`; once it raises `ClaimLost` this runner is replaced and says nothing more."""
        try:
            return check()
        except ClaimLost:
            self.replaced = True
            raise

    def check_cancelled(self, task: Task) -> None:
        if self.should_stop():
            self.emit(JobCancelledEvent())
            raise JobCancelled(f"stopped before stage {task.stage!r}")

    def check_budget(self, stage: str) -> None:
        """Stop before a stage when the money spent (billed: the nodes' time), plus what a stage of the same kind
        cost last time (the previous submodel, or its previous round), would exceed `max_cost_usd`, or when that
        projection exceeds what `budget_left` says is left."""
        projected = self.ledger.last_usd(stage)
        budget = self.spec.max_cost_usd
        if budget is not None:
            self.ledger.set_nodes(self.executor.node_lives())
            spent = self.ledger.spent_usd()
            if spent + projected > budget or spent >= budget:
                raise BudgetExceeded(f"stopped before stage {stage!r}: ${spent:.4f} spent + ${projected:.4f} "
                                     f"projected exceeds the ${budget:.4f} budget (max_cost_usd)")
        left = self.budget_left() if self.budget_left is not None else None
        if left is not None and (projected > left or left <= 0):
            raise BudgetExceeded(f"stopped before stage {stage!r}: ${projected:.4f} projected exceeds the "
                                 f"${max(left, 0.0):.4f} left of the owner's budget")


def run_job(spec: JobSpec, events: Events | None = None, progress: bool = True,
            should_stop: Callable[[], bool] | None = None, runner_id: str | None = None,
            budget_left: BudgetLeft | None = None) -> dict:
    """Run `spec` in this process, idempotently; returns {"output_dir", "final", "cost"}."""
    return JobRunner(spec, LocalExecutor(progress), events, should_stop, runner_id, budget_left).run()


__all__ = ["BudgetExceeded", "BudgetLeft", "Executor", "JobCancelled", "JobContext", "JobRunner", "LocalExecutor",
           "ClaimLost", "run_job"]
