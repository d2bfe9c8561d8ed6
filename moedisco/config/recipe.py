"""`recipe: auto`: how long each phase trains, chosen from the baseline budget by a rule fitted to a measured grid.

    spec = load_spec("examples/tiny.yaml", overrides=["recipe=auto", "full_parameter.steps=1200"])
    spec.submodel.steps, spec.branch.sync_rounds, spec.finetune.steps     # chosen for B = 1200

The budget is the full-parameter baseline the job stands in for: `full_parameter.steps` x its batch, in sequences.
The rule gives each submodel the baseline's batch divided among the E experts, so that the cheap phase steps with
the baseline's global batch: at a fixed number of sequences, a run's loss here follows its steps more than its batch,
and E submodels at the full batch each paid for E times the sequences of the steps they made (BENCHMARKS §9). It
gives the cheap phase (all E submodels together) and the fine-tune each a share of those sequences, and the
synchronisation rounds a fixed number. `benchmarks/paper_table.py` measured the grid it is fitted to (baseline
budgets B = 600, 1200, 2400 on the bundled corpus, the cheap phase's share varied; BENCHMARKS §9b), and
`benchmarks/fit_recipe.py` fits it: the cheap share with the lowest cost at equal quality, and the fine-tune share
that reached the baseline's loss there, as a power of B.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RecipeRule:
    """Phase lengths as shares of the baseline's sequences (B x its batch size)."""

    cheap_share: float  # sequences of all submodels together / the baseline's
    finetune_share_at_1000: float  # fine-tune sequences / the baseline's, at B = 1000 steps
    finetune_share_exponent: float  # how that share changes with B: x (B / 1000) ** exponent
    sync_rounds: int  # synchronisation rounds of the cheap phase

    def finetune_share(self, baseline_steps: int) -> float:
        return min(1.0, self.finetune_share_at_1000 * (baseline_steps / 1000) ** self.finetune_share_exponent)


# Fitted in BENCHMARKS §9b (`python benchmarks/fit_recipe.py runs/grid/*.json`).
RULE = RecipeRule(cheap_share=1.0, finetune_share_at_1000=0.25, finetune_share_exponent=0.0, sync_rounds=4)


@dataclass(frozen=True)
class Recipe:
    submodel_batch: int
    submodel_steps: int
    sync_rounds: int
    finetune_steps: int


def auto_recipe(baseline_steps: int, baseline_batch: int, num_experts: int, finetune_batch: int,
                rule: RecipeRule = RULE) -> Recipe:
    """The phase lengths for a baseline of `baseline_steps` x `baseline_batch` sequences."""
    budget = baseline_steps * baseline_batch
    submodel_batch = max(1, baseline_batch // num_experts)
    submodel_steps = max(1, round(rule.cheap_share * budget / (num_experts * submodel_batch)))
    finetune_steps = max(1, round(rule.finetune_share(baseline_steps) * budget / finetune_batch))
    return Recipe(submodel_batch, submodel_steps, min(rule.sync_rounds, submodel_steps), finetune_steps)
