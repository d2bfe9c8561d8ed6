"""The smallest annealed fine-tune that reaches a target loss: paper_table's equal-quality search.

    search = AnnealSearch(spec, target=5.03, every=20)
    run_job(spec, should_stop=search)          # the fine-tune's stable phase; stops once an anneal reached it
    step = search.smallest()                   # its stable steps; search.length(step) is the fine-tune's length

The fine-tune trains with a warmup-stable-decay schedule (`moedisco.training.schedule`). At the stable phase's
checkpoints k, 2k, 4k, ... (k = `every`) the runner polls `search`, which anneals that checkpoint
(`moedisco.stages.finetune.anneal`: the decay a fine-tune stopping there would end with) and evaluates it; the first
one at or below the target stops the run. `smallest` then bisects the checkpoints between the last miss and that hit.
A fine-tune that stops at stable step t is t + decay steps long: that length is what the cost counts. The search
itself (the anneals that missed) is the benchmark's cost, not the job's: a job given that length trains it once
(with its warm-up a share of that length, not of the cap: a step or two apart).
"""

from __future__ import annotations

import torch

from moedisco.job.layout import JobPaths
from moedisco.stages.finetune import anneal
from moedisco.training.checkpoint import CHECKPOINT_NAME, checkpoint_dirs
from moedisco.training.schedule import decay_start, decayed_from, warmup_steps


class AnnealSearch:
    """The fine-tune's `should_stop`: anneals its stable checkpoints at doubling steps, true at the first that
    reaches `target`. `losses` maps each annealed stable step to its annealed held-out loss."""

    def __init__(self, spec, target: float, every: int):
        cfg = spec.finetune
        if cfg.schedule != "wsd" or cfg.checkpoint_every != every or cfg.keep_checkpoints * every <= cfg.steps:
            raise ValueError(f"the search needs a wsd fine-tune checkpointed every {every} steps, each kept")
        self.spec, self.target, self.every = spec, target, every
        self.last = decay_start(cfg) // every * every  # the last stable checkpoint
        self.paths = JobPaths(spec.output_dir)
        self.losses: dict[int, float] = {}
        self.seconds: dict[int, float] = {}  # the annealed fine-tune's own seconds (stable part + decay)

    def __call__(self) -> bool:
        step = self._newest_checkpoint()
        if step is None or not self._worth_trying(step):
            return False
        return self.anneal(step) <= self.target

    def _newest_checkpoint(self) -> int | None:
        checkpoints = checkpoint_dirs(self.paths.run_dir("finetune"))
        return int(CHECKPOINT_NAME.fullmatch(checkpoints[-1].name).group(1)) if checkpoints else None

    def _worth_trying(self, step: int) -> bool:
        multiple = step // self.every
        doubling = step % self.every == 0 and multiple & (multiple - 1) == 0
        return step not in self.losses and (doubling or step == self.last) and step <= self.last

    def anneal(self, step: int) -> float:
        if step < warmup_steps(self.spec.finetune):
            return float("inf")  # still warming up: no stable phase to decay from yet
        # The stable run goes on afterwards with the RNG state it had (the anneal reseeds torch's generators).
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            _, result = anneal(self.paths, step)
        self.losses[step], self.seconds[step] = result.eval_loss, result.seconds
        return result.eval_loss

    def smallest(self) -> int | None:
        """The smallest stable step (a multiple of `every`) whose anneal reaches the target, or None."""
        hits = [step for step, loss in self.losses.items() if loss <= self.target]
        if not hits:
            return None
        high = min(hits)
        low = max((step for step in self.losses if step < high), default=0)
        while high - low > self.every:  # the checkpoints between the last miss and the first hit (all on the grid)
            middle = low + max(1, (high - low) // (2 * self.every)) * self.every
            if self.anneal(middle) <= self.target:
                high = middle
            else:
                low = middle
        return high

    def length(self, step: int) -> int:
        """The steps of a fine-tune annealed at stable step `step` (stable steps + its decay)."""
        return decayed_from(self.spec.finetune, step).steps
