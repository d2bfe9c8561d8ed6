"""A job's events on the terminal (`moedisco run`, in process or on Ray).

    run_job_on_ray(spec, events=ConsoleProgress())
    run_job(spec, events=ConsoleProgress(steps=False))   # training steps are drawn as progress bars instead

Stage starts and ends, one line per change of the experts' states on Ray (which are waiting for a node, running,
done), and the loss at every evaluation.
"""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console

from moedisco.job.events import (
    Event,
    ExpertState,
    JobCancelledEvent,
    Progress,
    StageFinished,
    StageSkipped,
    StageStarted,
)


class ConsoleProgress:
    def __init__(self, forward: Callable[[Event], None] | None = None, console: Console | None = None,
                 steps: bool = True):
        self.forward, self.console, self.steps = forward, console or Console(), steps
        self.expert_states: dict[int, str] = {}
        self.handlers = {StageStarted: self.on_stage_started, StageSkipped: self.on_stage_skipped,
                         StageFinished: self.on_stage_finished, ExpertState: self.on_expert_state,
                         Progress: self.on_progress, JobCancelledEvent: self.on_job_cancelled}

    def __call__(self, event: Event) -> None:
        handler = self.handlers.get(type(event))
        if handler is not None:
            handler(event)
        if self.forward is not None:
            self.forward(event)

    @staticmethod
    def _name(event: Event) -> str:
        name = event.stage if event.expert is None else f"{event.stage}[{event.expert}]"
        return name if event.round is None else f"{name} round {event.round + 1}"

    def on_stage_started(self, event: StageStarted) -> None:
        self.console.print(f"[cyan]start[/cyan] {self._name(event)}")

    def on_stage_skipped(self, event: StageSkipped) -> None:
        self.console.print(f"[dim]skip {self._name(event)} (already done)[/dim]")

    def on_stage_finished(self, event: StageFinished) -> None:
        summary = event.summary
        loss = summary.get("eval_loss")
        where = f" on {summary['gpu_type']}" if summary.get("gpu_type") else ""
        took = f" in {summary['seconds']:.1f}s" if "seconds" in summary else ""
        self.console.print(f"[green]done[/green] {self._name(event)}{where}{took}"
                           + (f"  held-out loss {loss:.4f}" if loss is not None else ""))

    def on_expert_state(self, event: ExpertState) -> None:
        if event.stage != "submodel":
            self.console.print(f"  {event.stage}: {event.state}")
            return
        self.expert_states[event.expert] = event.state
        groups = {state: sorted(k for k, s in self.expert_states.items() if s == state)
                  for state in ("waiting", "running", "done", "cancelled")}
        self.console.print("  experts  " + "  ".join(f"{state}: {ks}" for state, ks in groups.items() if ks))

    def on_progress(self, event: Progress) -> None:
        if self.steps and event.loss is not None:
            held_out = event.eval_loss if event.eval_loss is not None else float("nan")
            self.console.print(f"  {self._name(event)} step {event.step}/{event.total_steps}  "
                               f"loss {event.loss:.4f}  held-out {held_out:.4f}  on {getattr(event, 'gpu_type', None)}")

    def on_job_cancelled(self, event: JobCancelledEvent) -> None:
        self.console.print("[yellow]cancelled[/yellow]: trainers stopped; finished stages and checkpoints kept")
