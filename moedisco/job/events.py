"""What a running job says, as typed events: made by the runners and the training loop, read by the service's
recorder, the terminal progress and the tests. Each is a pydantic model, so it pickles across Ray and dumps to the
JSON the service stores (`event.model_dump(mode="json")`; `parse_event` reads it back).

    events(StageStarted(stage="submodel", expert=1, round=0))
    events(StageFinished(stage="submodel", expert=1, round=0, summary={...}, final=False))   # a round, not the end
    events(Progress(stage="submodel", expert=1, step=40, total_steps=100, loss=5.1, eval_loss=5.3))

| event           | made by                   | means                                                                 |
| stage_started   | the runner                | a task of the job starts (on Ray: is queued for its tier)             |
| stage_skipped   | the runner                | a task was already done (its marker exists)                           |
| stage_finished  | the runner                | a task ended; `final` is False for a stage that goes on in a later    |
|                 |                           | synchronisation round (the service shows it `between_rounds`)         |
| progress        | the training loop         | a logged step: the metrics record (step, loss, eval_loss, node, ...)  |
| expert_state    | the Ray runner            | a trainer is waiting for a node, running, done or cancelled           |
| worker_started  | a Ray Train worker        | rank 0 of a trainer started (attempt counting; not passed on)         |
| node_use        | Ray workers and tasks     | work of the job held resources on a node from `start` (to `end`):     |
|                 |                           | what the billed cost attributes node time by                          |
| job_cancelled   | the runners               | the job stopped on request; finished stages and checkpoints are kept  |
| runner          | the service's job runner  | a runner of the job started, handed the job over to another control   |
|                 |                           | plane's cluster, or ended; which Ray session and node it ran in       |
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    event: str
    stage: str | None = None
    expert: int | None = None
    round: int | None = None  # the synchronisation round, for stages run per round


class StageStarted(Event):
    event: Literal["stage_started"] = "stage_started"


class StageSkipped(Event):
    event: Literal["stage_skipped"] = "stage_skipped"


class StageFinished(Event):
    event: Literal["stage_finished"] = "stage_finished"
    summary: dict[str, Any] = Field(default_factory=dict)
    final: bool = True  # False: a synchronisation round ended, the stage goes on in the next one


class Progress(Event):
    """A logged training step; besides these fields it carries the rest of the metrics record."""

    model_config = ConfigDict(frozen=True, extra="allow")
    event: Literal["progress"] = "progress"
    step: int
    total_steps: int | None = None
    loss: float | None = None
    eval_loss: float | None = None


class ExpertState(Event):
    event: Literal["expert_state"] = "expert_state"
    state: Literal["waiting", "running", "done", "cancelled", "preempted"]  # preempted: checkpointed on notice,
    # its trainer starts again from that step
    attempt: int = 0
    step: int | None = None  # preempted: the step it checkpointed and starts again from


class WorkerStarted(Event):
    event: Literal["worker_started"] = "worker_started"
    time: float
    node: str | None = None
    gpu_type: str | None = None
    pid: int | None = None
    resume_step: int | None = None  # the checkpoint step this worker starts from (0: from the beginning)


class NodeUse(Event):
    """Work of the job held `resources` on Ray node `node` from `start` to `end` (unix seconds). A worker says so as
    it starts (`end` None: still holding them) and again as it ends; the driver closes what a killed worker left
    open when it learns the work ended. `(node, pid, start)` names one use."""

    event: Literal["node_use"] = "node_use"
    node: str
    pid: int
    start: float
    end: float | None = None
    resources: dict[str, float] = Field(default_factory=dict)  # what Ray assigned it on the node (CPU, GPU)

    @property
    def use_id(self) -> tuple[str, int, float]:
        return self.node, self.pid, self.start


class JobCancelledEvent(Event):
    event: Literal["job_cancelled"] = "job_cancelled"


class RunnerEvent(Event):
    event: Literal["runner"] = "runner"
    runner: str  # the runner's id (its lease on the job)
    state: Literal["started", "handed_over", "ended"]
    ray_session: str | None = None  # its cluster's Ray session (None: not in a Ray actor)
    node: str | None = None


AnyEvent = Annotated[Union[StageStarted, StageSkipped, StageFinished, Progress, ExpertState, WorkerStarted,
                           NodeUse, JobCancelledEvent, RunnerEvent], Field(discriminator="event")]
Events = Callable[[Event], None]
_ADAPTER: TypeAdapter = TypeAdapter(AnyEvent)


def parse_event(data: dict) -> Event:
    """An event from its JSON form (as the service stores it)."""
    return _ADAPTER.validate_python(data)


def progress_event(record: dict) -> Progress:
    """The training loop's metrics record as a progress event."""
    return Progress(**{key: value for key, value in record.items() if key != "event"})


def ignore(event: Event) -> None:
    """The callback of a job nobody watches."""
