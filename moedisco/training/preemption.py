"""Checkpoint on notice: a preempted training run writes a checkpoint at its current step and exits.

    notice = PreemptionNotice()
    with notice.on_sigterm():                       # main thread only; elsewhere the runner's own signal is used
        train(model, train_NL, eval_NL, cfg, TrainContext(..., hooks=TrainHooks(preempted=notice)))
    # -> raises Preempted(step) after the checkpoint at that step

Spot nodes are taken back after a notice (SIGTERM and the pod's grace period, or a Ray drain that Ray Train passes
on as `ray.train.get_preemption_info`). The loop asks `TrainHooks.preempted` after every step; once it says yes the
loop checkpoints that step and raises `Preempted`, which a runner counts apart from failures and answers by starting
that trainer again from that step. A stage that does not poll the flag keeps its finished pieces and is interrupted
at once (`interrupting`); a run killed without notice resumes from its last periodic checkpoint.

The notice's checkpoint is bounded: the loop waits for it at most `TrainHooks.notice_seconds()` (`within_deadline`),
then stops either way, and says how it went in `Preempted.checkpoint` (a `NoticeCheckpoint`: seconds, bytes, whether
it is on storage). One that missed the deadline may still land, whole (it is renamed into place once synced); if it
does not, the run resumes from the newest checkpoint that did.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
NOTICE_WRITER = "notice-checkpoint"  # the name of the thread writing a notice's checkpoint


@dataclass(frozen=True)
class NoticeCheckpoint:
    """How the checkpoint after a preemption notice went, as the log and the trainer's summary report it."""

    step: int  # the step the run reached, and checkpointed when `durable`
    durable: bool  # synced and in place within `deadline_s`
    seconds: float  # from the loop seeing the notice to the checkpoint in place, or to giving up on it
    num_bytes: int  # of the checkpoint's files; 0 when it was not in place in time
    deadline_s: float | None  # what it was allowed; None: no bound


def within_deadline(write: Callable[[], T], deadline_s: float | None) -> T | None:
    """`write()`'s result if it returns within `deadline_s` seconds (None: however long it takes), else None while
    it goes on in a daemon thread; raises what it raised in time."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = write()
        except BaseException as error:  # noqa: BLE001 - raised again on the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name=NOTICE_WRITER, daemon=True)
    thread.start()
    thread.join(None if deadline_s is None else max(0.0, deadline_s))
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


class PreemptionNotice:
    """A flag set once the node is to be taken back; the training loop polls it (`TrainHooks.preempted`)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None
        self._stop: Callable[[str], BaseException] | None = None

    def __call__(self) -> bool:
        return self._event.is_set()

    def notify(self, reason: str) -> None:
        self.reason = self.reason or reason
        self._event.set()

    @contextlib.contextmanager
    def on_sigterm(self) -> Iterator[PreemptionNotice]:
        """SIGTERM sets the flag instead of ending the process, while inside. Python lets only the main thread
        install a handler; elsewhere (a Ray Train worker's training thread, a service thread) this does nothing
        and the runner passes the notice on in its own way."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            yield self
        finally:  # left unclosed, the garbage collector may finish this on another thread, which cannot restore it
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, previous)

    def _on_sigterm(self, signum, frame) -> None:
        self.notify("SIGTERM")
        if self._stop is not None:
            raise self._stop(self.reason)

    @contextlib.contextmanager
    def interrupting(self, stop: Callable[[str], BaseException]) -> Iterator[None]:
        """Inside, a SIGTERM raises `stop(reason)` at once, wherever the main thread is (for a stage that never
        polls the flag); a notice that came before raises it on entry."""
        if self():
            raise stop(self.reason or "preempted")
        self._stop = stop
        try:
            yield
        finally:
            self._stop = None
