"""Running one task of a job in this process: the stage's function, named here, and its memory meter.

    summary = run_stage(StageRun(spec, JobPaths(spec.output_dir), metrics, task=Task("merge")))

Both runners call it: the local one directly, the Ray one inside each task's worker or trainer.
"""

from __future__ import annotations

from collections.abc import Callable

from moedisco.job.registry import STAGE
from moedisco.stages import branch, cluster, embed, evaluate, finetune, merge, prepare, split, sync
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
    "evaluate": evaluate.stage_evaluate,
}
assert set(STAGE_FUNCTIONS) == set(STAGE), "every stage of moedisco.job.registry has its function here"


def run_stage(run: StageRun) -> dict:
    """Run one task in this process; returns its summary. A training stage's summary adds its peak memory
    (`peak_memory_gb`, metered from before its model is built) and the memory measures it trained with."""
    stage = STAGE[run.task.stage]
    function = STAGE_FUNCTIONS[stage.name]
    if not stage.trained:
        return function(run)
    cfg = getattr(run.spec, stage.train_config)
    run.meter = PeakMemory(resolve_device(cfg.device))
    summary = function(run)
    return {**summary, "peak_memory_gb": run.meter.peak_gb(), "memory_measures": measures_of(cfg)}
