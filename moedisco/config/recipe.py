"""`recipe: auto`: how long each phase trains, chosen from the baseline budget by a rule fitted to a measured grid.

    spec = load_spec("examples/tiny.yaml", overrides=["recipe=auto", "full_parameter.steps=1200"])
    spec.submodel.steps, spec.branch.sync_rounds, spec.finetune.steps     # chosen for B = 1200

The budget is the full-parameter baseline the job stands in for: `full_parameter.steps` x its batch, in sequences.
The rule gives each submodel the baseline's batch divided among the E experts, so that the cheap phase steps with
the baseline's global batch: at a fixed number of sequences, a run's loss here follows its steps more than its batch,
and E submodels at the full batch each paid for E times the sequences of the steps they made (BENCHMARKS §9). It
gives the cheap phase (all E submodels together) and the fine-tune each a share of those sequences, and syncs the
backbones every `steps_per_round` submodel steps: with a fixed number of rounds a longer cheap phase let them drift
further apart, and the merged model stopped improving (BENCHMARKS §9). `benchmarks/paper_table.py` measured the grid it is fitted to (baseline
budgets B = 600, 1200, 2400 on the bundled corpus, the cheap phase's share varied; BENCHMARKS §9), and
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
    steps_per_round: int  # submodel steps between two synchronisations of the backbones

    def finetune_share(self, baseline_steps: int) -> float:
        return min(1.0, self.finetune_share_at_1000 * (baseline_steps / 1000) ** self.finetune_share_exponent)


# Fitted in BENCHMARKS §9 (`benchmarks/results_fit_recipe.json`): k-means, one seed at B = 1200 and 2400, three
# at 600, on the bundled corpus and the tiny model. The fine-tune's share grows with B: past B ~ 1500 here the job
# costs as much as its baseline (the cheap phase stops improving the merged model; BENCHMARKS §9).
RULE = RecipeRule(cheap_share=1.0, finetune_share_at_1000=0.3864, finetune_share_exponent=0.8522, steps_per_round=150)


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
    rounds = max(1, round(submodel_steps / rule.steps_per_round))
    return Recipe(submodel_batch, submodel_steps, rounds, finetune_steps)
