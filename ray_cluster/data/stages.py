"""How each data stage runs on Ray: the one table that the executor and the job's data worker read.

    DATA_STAGES["embed"].on_ray_data(spec, paths, max_nodes)   # Ray Data over the stage's tier
    DATA_STAGES["embed"].in_one_process(spec, paths)           # in the job's data worker
    DATA_STAGES["source"]                                      # DataStage(): moedisco's stage as it is

The data stages are moedisco's set-up stages. For a corpus of one shard, prepare, embed and cluster run in the job's
`DataWorker` (`ray_cluster.data.data_worker`), one process on the cheap tier: a stage's `in_one_process` where it
has one, else moedisco's stage function as it is. Otherwise a stage with `on_ray_data` runs it in a zero-CPU task on
the driver's node that drives Ray Data's actor pools over the stage's tier (the CPU tier for prepare, the cheap tier
for embed and cluster). `source`, which builds the whole model, always runs moedisco's stage function in a Ray task
of its own on the CPU tier (`ray_cluster.orchestrate.RayExecutor.submit_setup`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moedisco.job.registry import STAGES
from ray_cluster.data.embed_cluster import cluster_in_process, cluster_stage, embed_in_process, embed_stage
from ray_cluster.data.prepare import prepare_stage


@dataclass(frozen=True)
class DataStage:
    # (spec, paths, max_nodes, reporter=`node_uses.NodeUseReporter`); None: moedisco's, in a Ray task
    on_ray_data: Callable[..., dict] | None = None
    in_one_process: Callable[..., dict] | None = None  # (spec, paths), in the data worker; None: moedisco's


DATA_STAGES = {
    "prepare": DataStage(on_ray_data=prepare_stage),
    "embed": DataStage(on_ray_data=embed_stage, in_one_process=embed_in_process),
    "cluster": DataStage(on_ray_data=cluster_stage, in_one_process=cluster_in_process),
    "source": DataStage(),
}
assert set(DATA_STAGES) == {stage.name for stage in STAGES if stage.setup}, "every set-up stage has its row here"
