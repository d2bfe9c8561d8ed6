"""Running one task of a job in this process: the stage's function, named here, and its memory meter.

    summary = run_stage(StageRun(spec, JobPaths(spec.output_dir), metrics, task=Task("merge")))

Both runners call it: the local one directly, the Ray one inside each task's worker or trainer.
"""

from __future__ import annotations

from collections.abc import Callable

from moedisco.job.registry import STAGE
from moedisco.stages import branch, cluster, embed, evaluate, extend, finetune, merge, prepare, retire, split, sync
from moedisco.stages.stage_run import StageRun
from moedisco.training.memory import PeakMemory, measures_of, resolve_device

STAGE_FUNCTIONS: dict[str, Callable[[StageRun], dict]] = {
    "prepare": prepare.stage_prepare,
    "embed": embed.stage_embed,
    "cluster": cluster.stage_cluster,
    "source": split.stage_source,
    "warmup": branch.stage_warmup,
    "submodel": branch.stage_submodel,
    "sync": sync.stage_sync,
    "merge": merge.stage_merge,
    "finetune": finetune.stage_finetune,
    "full_parameter": finetune.stage_full_parameter,
    "retire": retire.stage_retire,
    "evaluate": evaluate.stage_evaluate,
}
assert set(STAGE_FUNCTIONS) == set(STAGE), "every stage of moedisco.job.registry has its function here"
# Where a method does a stage its own way: an extension's source, merge and fine-tune (moedisco.stages.extend).
METHOD_FUNCTIONS: dict[tuple[str, str], Callable[[StageRun], dict]] = {
    ("extend", "source"): extend.stage_source,
    ("extend", "merge"): extend.stage_merge,
    ("extend", "finetune"): extend.stage_finetune,
}


def stage_function(run: StageRun) -> Callable[[StageRun], dict]:
    """The function that runs `run`'s task for its job's method."""
    stage = run.task.stage
    return METHOD_FUNCTIONS.get((run.spec.method, stage), STAGE_FUNCTIONS[stage])


def run_stage(run: StageRun) -> dict:
    """Run one task in this process; returns its summary. A training stage's summary adds its peak memory
    (`peak_memory_gb`, metered from before its model is built) and the memory measures it trained with."""
    stage = STAGE[run.task.stage]
    function = stage_function(run)
    if not stage.trained:
        return function(run)
    cfg = getattr(run.spec, stage.train_config)
    run.meter = PeakMemory(resolve_device(cfg.device))
    summary = function(run)
    return {**summary, "peak_memory_gb": run.meter.peak_gb(), "memory_measures": measures_of(cfg)}
