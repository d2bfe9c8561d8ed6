"""Checkpoint on notice: a preempted training run writes a checkpoint at its current step and exits.

    notice = PreemptionNotice()
    with notice.on_sigterm():                       # main thread only; elsewhere the runner's own signal is used
        train(model, train_NL, eval_NL, cfg, TrainContext(..., hooks=TrainHooks(preempted=notice)))
    # -> raises train.Preempted(step) after the checkpoint at that step

Spot and preemptible nodes are taken back after a notice: Kubernetes sends SIGTERM and waits the pod's grace
period (GKE spot about 30 s, AWS spot 120 s), and Ray marks a node it is told to give up as draining, which
Ray Train passes on to its workers (`ray.train.get_preemption_info`). The training loop asks its
`TrainHooks.preempted` after every step; once it says yes the loop checkpoints that step (one step plus one
checkpoint must fit in the grace period) and raises `Preempted`, which a runner counts apart from failures and
answers by starting only that trainer again, from that step: no step is lost. A run killed without notice
(SIGKILL, a lost node) still resumes from its last periodic checkpoint, at most `checkpoint_every` steps back.

A stage that does not poll the flag (prepare, embed, cluster, merge, evaluate: each keeps its finished pieces and
redoes only the rest) is interrupted at once instead (`interrupting`), rather than running on until Kubernetes
follows the notice with SIGKILL at the end of the grace period.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator


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
