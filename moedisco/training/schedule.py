"""Learning-rate schedules, and the decay that anneals a warmup-stable-decay run where it stops.

    lr = cfg.lr * lr_multiplier(cfg, step)               # linear warm-up, then constant/cosine/linear/wsd
    branch = decayed_from(cfg, at_step=400)              # the same run, ending with its decay after step 400

`wsd` (warmup-stable-decay) holds the peak rate after the warm-up and spends its last `decay_ratio` of the steps
decaying towards zero in the 1 - sqrt shape (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond
Fixed Training Durations", which matches cosine with a 20% decay). Its stable phase is the same whatever the run's length,
so a checkpoint taken there can be annealed at any step: `decayed_from` is that run, of `at_step / (1 - decay_ratio)`
steps. That is what makes a fine-tune's length something to search for, not to fix in advance.
"""

from __future__ import annotations

import math

from moedisco.config.spec import TrainConfig


def warmup_steps(cfg: TrainConfig) -> int:
    return int(cfg.warmup_ratio * cfg.steps)


def decay_start(cfg: TrainConfig) -> int:
    """The step at which a `wsd` run's decay begins (its stable phase is the steps before)."""
    return cfg.steps - round(cfg.decay_ratio * cfg.steps)


def lr_multiplier(cfg: TrainConfig, step: int) -> float:
    """The learning rate of `step` (0-based) as a fraction of `cfg.lr`."""
    warmup = warmup_steps(cfg)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        start = decay_start(cfg)
        # Decay step i of d at 1 - sqrt((i + 1) / (d + 1)): every step of it still learns, down to near zero.
        return 1.0 if step < start else 1.0 - math.sqrt((step - start + 1) / (cfg.steps - start + 1))
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    if cfg.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def decayed_from(cfg: TrainConfig, at_step: int) -> TrainConfig:
    """The `wsd` run that follows `cfg`'s stable phase to `at_step` and then decays over `decay_ratio` of its
    length: resumed from `cfg`'s checkpoint at `at_step`, it anneals that checkpoint. Refuses a step outside the
    stable phase (before the warm-up ends, or in the decay)."""
    if cfg.schedule != "wsd":
        raise ValueError(f"only a wsd schedule has a stable phase to decay from (this one is {cfg.schedule!r})")
    if not warmup_steps(cfg) <= at_step <= decay_start(cfg):
        raise ValueError(f"step {at_step} is not in the stable phase ({warmup_steps(cfg)}..{decay_start(cfg)})")
    decay = max(1, round(at_step * cfg.decay_ratio / (1.0 - cfg.decay_ratio)))
    steps = at_step + decay
    # The decay's share of the branch exactly, so that its `decay_start` is `at_step`; and the warm-up of `cfg`
    # (a ratio of a longer run could put the branch's warm-up past `at_step`).
    # (+ 0.5: `int` of a float product that should be whole must not come out one short.)
    return cfg.model_copy(update={"steps": steps, "decay_ratio": decay / steps,
                                  "warmup_ratio": (warmup_steps(cfg) + 0.5) / steps})
