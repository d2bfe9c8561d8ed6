"""What the stages of a job are, declared once, and a job's plan: light to import (no torch).

    STAGE["submodel"].tier                        # "submodel_tier": the cheap tier pays for it
    for group in plan(spec): ...                  # [[Task("prepare")], ..., [Task("submodel", 0, 0), ...], ...]

A job is a sequence of groups of tasks (`plan`); the tasks of one group (the experts of one synchronisation round)
may run at the same time, and a group starts once the one before it has finished. A task is known by its `key`
(stage, expert: the same across rounds) and its `marker` (per round: the file it leaves when done, which is how a
re-run skips it, and the name of its run). Each stage's function is `moedisco.runner.execute.STAGE_FUNCTIONS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from moedisco.config.resources import ResourcesConfig, TierConfig
    from moedisco.config.spec import JobSpec

Tier = Literal["submodel_tier", "finetune_tier", "cpu_tier"]


@dataclass(frozen=True)
class Stage:
    name: str
    tier: Tier  # the `ResourcesConfig` tier that runs and pays for it
    trained: bool = False  # runs moedisco's training loop (on Ray: a Ray Train trainer, resumable)
    train_config: str | None = None  # the `JobSpec` section with its `TrainConfig`
    setup: bool = False  # cheap CPU work before any training; the Ray runner may run it in the job's data worker
    per_expert: bool = False
    per_round: bool = False  # repeats per synchronisation round (`branch.sync_rounds`)
    reads: tuple[str, ...] = ()  # `JobPaths` attributes it needs
    writes: tuple[str, ...] = ()  # `JobPaths` attributes it makes


STAGES = (
    Stage("prepare", "cpu_tier", setup=True, writes=("data", "tokenizer")),
    Stage("embed", "submodel_tier", setup=True, reads=("data",),
          writes=("embeddings",)),
    Stage("cluster", "submodel_tier", setup=True, reads=("embeddings",),
          writes=("clusters",)),
    Stage("source", "cpu_tier", setup=True, reads=("tokenizer",), writes=("source",)),
    Stage("warmup", "submodel_tier", trained=True, train_config="submodel",
          reads=("data", "source"), writes=("branched",)),
    Stage("submodel", "submodel_tier", trained=True, train_config="submodel",
          per_expert=True, per_round=True, reads=("data", "clusters", "source"), writes=("submodels",)),
    Stage("sync", "submodel_tier", per_round=True,
          reads=("clusters", "source", "submodels"), writes=("submodels",)),
    Stage("merge", "submodel_tier", reads=("data", "clusters", "submodels"),
          writes=("merged",)),
    Stage("finetune", "finetune_tier", trained=True, train_config="finetune",
          reads=("data", "merged"), writes=("final",)),
    Stage("full_parameter", "finetune_tier", trained=True,
          train_config="full_parameter", reads=("data", "source"), writes=("final",)),
    # `method: retire`: slicing tensors, then held-out losses per domain layer by layer, as the merge.
    Stage("retire", "submodel_tier", writes=("final",)),
    # Optional (spec section `evaluate`): downstream tasks on the final model, scored on the expensive tier.
    Stage("evaluate", "finetune_tier", reads=("final",), writes=("evaluation",)),
)
STAGE = {stage.name: stage for stage in STAGES}
STAGE_NAMES = tuple(STAGE)  # in pipeline order


def tier_of(resources: ResourcesConfig, stage: str) -> TierConfig:
    """The tier that runs and pays for `stage`."""
    return getattr(resources, STAGE[stage].tier)


def pipeline_order(stage: str) -> int:
    return STAGE_NAMES.index(stage) if stage in STAGE else len(STAGE_NAMES)


@dataclass(frozen=True)
class Task:
    """One run of a stage: for an expert and a synchronisation round where the stage has them."""

    stage: str
    expert: int | None = None
    round: int | None = None  # set only for stages run per round in a job with more than one round
    marker: str = ""  # the stage marker left when it is done (`moedisco.job.layout.mark_done`)

    def __post_init__(self) -> None:
        if not self.marker:
            object.__setattr__(self, "marker", _marker(self.stage, self.expert, self.round))

    @property
    def ids(self) -> dict:
        """The task's identity as events and metrics carry it."""
        return {"stage": self.stage, "expert": self.expert, "round": self.round}

    @property
    def key(self) -> tuple[str, int | None]:
        return self.stage, self.expert


def _marker(stage: str, expert: int | None, round_index: int | None) -> str:
    base = stage if expert is None else f"{stage}_{expert}"
    return base if round_index is None else f"{base}_{round_index}"


def submodel_task(spec: JobSpec, expert: int, round_index: int) -> Task:
    """An expert's round; the last round's marker is the plain `submodel_<k>` of a job without rounds."""
    rounds = spec.branch.sync_rounds
    last = round_index == rounds - 1
    marker = f"submodel_{expert}" if last else f"submodel_{expert}_round_{round_index}"
    return Task("submodel", expert, round_index if rounds > 1 else None, marker)


def plan(spec: JobSpec) -> list[list[Task]]:
    """The job's tasks in order, grouped: the tasks of a group may run at once."""
    evaluate = [[Task("evaluate")]] if spec.evaluate is not None else []
    if spec.method == "full_parameter":
        return [[Task("prepare")], [Task("source")], [Task("full_parameter")]] + evaluate
    if spec.method == "retire":
        return [[Task("retire")]] + evaluate
    # An extension's source is the base model with its new experts, its submodels those experts: no warm-up.
    groups = [[Task("prepare")]] + ([[Task("embed")]] if needs_embeddings(spec) else []) + [[Task("cluster")],
                                                                                             [Task("source")]]
    if spec.branch.warmup_steps > 0 and spec.method == "moe_disco":
        groups.append([Task("warmup")])
    for round_index in range(spec.branch.sync_rounds):
        if round_index > 0:
            groups.append([Task("sync", round=round_index - 1)])
        groups.append([submodel_task(spec, k, round_index) for k in range(spec.num_clusters)])
    return groups + [[Task("merge")], [Task("finetune")]] + evaluate


def needs_embeddings(spec: JobSpec) -> bool:
    """Whether the job clusters document embeddings: not when the domains are declared (`cluster.method: field`)
    or there is one cluster only (an extension by one expert)."""
    return spec.cluster.method != "field" and spec.num_clusters > 1


def round_ends(spec: JobSpec) -> list[int]:
    """The submodel step at which each synchronisation round ends (`branch.sync_rounds`); the last is the end."""
    steps, rounds = spec.submodel.steps, spec.branch.sync_rounds
    return [steps * (r + 1) // rounds for r in range(rounds)]
