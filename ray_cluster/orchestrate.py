"""Run a whole job on Ray: the local runner's stages and bookkeeping, each stage placed on its tier.

    summary = run_job_on_ray(load_spec("examples/tiny.yaml"))                    # fresh local simulated cluster
    summary = run_job_on_ray(spec, address="10.0.0.5:6379", events=store.add, should_stop=job.cancelled)

`RayRunner` is `moedisco.runner.LocalRunner` with one method replaced: `stage` keeps its skip-if-done, budget,
events, cost ledger and stage markers, but swaps the in-process work for its Ray placement:

| stage          | where it runs                                                                  |
| prepare/source | a Ray task                                                                     |
| embed, cluster | Ray Data on the cheap tier (`ray_cluster.data`)                                |
| one-shard data | prepare, embed, cluster and source in one `DataWorker` actor on the cheap tier |
| warmup         | a Ray Train trainer on the cheap tier (when `branch.warmup_steps` > 0)         |
| submodel       | one Ray Train trainer per expert on the cheap tier, all queued at the first    |
|                | (per synchronisation round with `branch.sync_rounds` > 1)                      |
| sync           | a Ray task on the cheap tier, between rounds, reading the round's checkpoints  |
| merge          | a Ray task on the cheap tier, reading the submodels from storage               |
| finetune       | a Ray Train trainer on the expensive tier (also the full-parameter baseline)   |

A MoE-DisCo job whose train split fits one shard (`ray_cluster.prestart.fits_one_process`: known from
`data.max_documents` before prepare, else counted after it) runs its data stages in one process. That data worker
and the trainers' launcher are started with the job (`ray_cluster.prestart`, by the service before it even imports
this module), so their imports overlap the job's own start; the worker is stopped before the first training stage,
which frees its node.

Re-running a job whose driver died skips finished stages (their markers) and resumes the interrupted one from its
checkpoints. Events are the local runner's plus `{"event": "expert_state", "expert": k, "state": "waiting" |
"running" | "done" | "cancelled"}`; `should_stop()` turning true cancels the job (`JobCancelled`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator

import ray

from moedisco import pipeline as stages
from moedisco.config import JobSpec, TierConfig
from moedisco.metrics import MetricsWriter
from moedisco.runner import LocalRunner
from ray_cluster import data, prestart
from ray_cluster.cluster import LocalClusterSpec, start_local_cluster, stop_local_cluster
from ray_cluster.placement import label_selector, on_driver_node, run_name, storage_root, tier_nodes, tier_of
from ray_cluster.progress import ConsoleProgress
from ray_cluster.tracking import JobCancelled, Tracker
from ray_cluster.trainers import build_trainer, num_workers

Events = Callable[[dict], None]


class RayRunner(LocalRunner):
    def __init__(self, spec: JobSpec, events: Events | None = None, progress: bool = True,
                 should_stop: Callable[[], bool] | None = None):
        super().__init__(spec, events, progress, should_stop)
        self.announced: set = set()
        self.launched_round: int | None = None  # the synchronisation round whose submodel trainers are queued
        self.events = self._without_late_starts(self.events)
        self.tracker = Tracker(self.events, should_stop)
        self.data_worker = None

    def _without_late_starts(self, emit: Events) -> Events:
        # Submodel trainers all start at once, and their "stage_started" is sent then; the base class sends it
        # again when it comes to wait for each expert in turn.
        def forward(event: dict) -> None:
            key = (event.get("stage"), event.get("expert"), event.get("round"))
            if event["event"] == "stage_started" and key in self.announced:
                return
            emit(event)
        return forward

    def stage(self, name: str, tier: TierConfig | None, work: Callable[[], dict], expert: int | None = None,
              round_index: int | None = None) -> dict:
        """The base class's stage bookkeeping around the stage's Ray placement (`work`, in process, is not run)."""
        if name not in prestart.DATA_STAGES:
            self.stop_data_worker()  # its node is the first trainer's
        if name == "submodel" and self.launched_round != (round_index or 0):
            self.launch_submodels(round_index)
        # The base class records the stage's cost with the node and node count from its summary.
        return super().stage(name, tier, lambda: self.run_placed(name, expert, round_index), expert, round_index)

    def run_placed(self, name: str, expert: int | None, round_index: int | None = None) -> dict:
        spec, paths = self.spec, self.paths
        cheap = label_selector(spec, spec.resources.submodel_tier)
        if name in ("prepare", "source"):
            work = stages.stage_prepare if name == "prepare" else stages.stage_source
            if self.data_worker is not None:
                return self.on_data_worker(name, "run", work, spec, paths)
            return self.remote((name, None), work, spec, paths)
        if name in ("embed", "cluster") and self.data_worker is None and prestart.data_stages_in_one_process(spec):
            self.data_worker = prestart.start_data_worker(spec)  # the corpus's size was known only after prepare
        if name in ("embed", "cluster") and self.data_worker is not None:
            return self.on_data_worker(name, name, spec, paths)
        if name == "embed":
            num_nodes = len(tier_nodes(spec, spec.resources.submodel_tier))
            return self.remote((name, None), data.embed_stage, spec, paths, num_nodes, options=on_driver_node())
        if name == "cluster":
            return self.remote((name, None), data.cluster_stage, spec, paths, options=on_driver_node())
        if name == "merge":
            summary = self.remote((name, None), stages.stage_merge, spec, paths, MetricsWriter(paths.metrics),
                                  options={"num_cpus": 1, "label_selector": cheap})
            return {**summary, "num_nodes": 1}
        if name == "sync":
            summary = self.remote((name, None), stages.stage_sync, spec, paths, round_index,
                                  MetricsWriter(paths.metrics), options={"num_cpus": 1, "label_selector": cheap})
            return {**summary, "num_nodes": 1}
        if name == "submodel":
            return self.trainer_result(name, expert)
        self.launch_trainer(name)
        return self.trainer_result(name, None)

    def after_sync(self, round_index: int) -> None:
        """Also drop the round's Ray Train runs: their reported checkpoint copies are never read again (the next
        round is a run of its own and resumes from the synced checkpoints in the job folder)."""
        super().after_sync(round_index)
        for expert in range(self.spec.model.num_experts):
            shutil.rmtree(storage_root(self.spec) / run_name(self.spec, "submodel", expert, round_index),
                          ignore_errors=True)

    def on_data_worker(self, name: str, method: str, *args) -> dict:
        self.tracker.submit((name, None), getattr(self.data_worker, method).remote(*args), actor=self.data_worker)
        return self.tracker.wait((name, None))

    def stop_data_worker(self) -> None:
        if self.data_worker is not None:
            ray.kill(self.data_worker)
            self.data_worker = None

    def prestart(self) -> None:
        """Adopt the helpers started for this job (`ray_cluster.prestart`), else start them now."""
        helpers = prestart.take_prestarted(self.spec) or prestart.start_helpers(self.spec)
        self.tracker.adopt_launcher(helpers.launcher)
        self.data_worker = helpers.data_worker

    def remote(self, key, function, *args, options: dict | None = None) -> dict:
        ref = ray.remote(function).options(max_retries=0, **(options or {"num_cpus": 1})).remote(*args)
        self.tracker.submit(key, ref)
        return self.tracker.wait(key)

    def launch_submodels(self, round_index: int | None) -> None:
        """Queue a trainer for every expert not yet done (in this synchronisation round, if there are rounds); as
        many run at once as there are cheap nodes."""
        pending = [k for k in range(self.spec.model.num_experts)
                   if not stages.is_done(self.paths, self.marker("submodel", k, round_index))]
        if pending:  # a resumed job skips finished rounds without a budget check each
            self.check_budget("submodel")
        for expert in pending:
            ids = {"stage": "submodel", "expert": expert, **({} if round_index is None else {"round": round_index})}
            self.events({"event": "stage_started", **ids})
            self.announced.add(("submodel", expert, round_index))
            self.launch_trainer("submodel", expert, round_index)
        self.launched_round = round_index or 0

    def launch_trainer(self, stage: str, expert: int | None = None, round_index: int | None = None) -> None:
        """Queue a trainer; it starts when its tier has a free slot. With no node of the tier yet (an autoscaler
        starting from zero) one trainer is submitted, whose pending placement group asks for a node."""
        spec, tier = self.spec, tier_of(self.spec, stage)

        def start():
            trainer = build_trainer(spec, stage, expert, events=self.tracker.queue, round_index=round_index)
            return self.tracker.launcher.fit.remote(trainer)

        def slots() -> int:
            return max(1, len(tier_nodes(spec, tier)) // num_workers(spec, stage))

        self.tracker.enqueue((stage, expert), start, slots)

    def trainer_result(self, stage: str, expert: int | None) -> dict:
        summary = self.tracker.wait((stage, expert))
        if summary.get("stopped"):
            raise JobCancelled(f"{stage} stopped on request")
        billed = self.tracker.billed_seconds((stage, expert), summary)
        self.tracker.forget((stage, expert))  # the next synchronisation round's trainer reuses the key
        return {**summary, "train_seconds": summary["seconds"], "seconds": billed}

    def run(self) -> dict:
        try:
            self.prestart()
            return super().run()
        finally:
            self.stop_data_worker()
            self.tracker.close()  # after an error or a cancel nothing of this job keeps running


@contextlib.contextmanager
def ray_connection(spec: JobSpec, address: str | None) -> Iterator[str]:
    """Reuse an initialised Ray, else connect to `address` (or RAY_ADDRESS), else start a local simulated cluster.

    Whatever this function started or connected it also stops; an already-initialised Ray is left as it was.
    """
    if ray.is_initialized():
        yield "existing"
        return
    address = address or os.environ.get("RAY_ADDRESS")
    started_cluster = address is None
    if started_cluster:
        address = start_local_cluster(spec=LocalClusterSpec.from_resources(spec.resources))
    try:
        # Worker output goes to the session logs and the dashboard; the driver shows progress instead.
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        yield address
    finally:
        ray.shutdown()
        if started_cluster:
            stop_local_cluster()


def run_job_on_ray(spec: JobSpec, address: str | None = None, progress: bool = True,
                   events: Events | None = None, should_stop: Callable[[], bool] | None = None) -> dict:
    """Run `spec` on a Ray cluster, idempotently; returns {"output_dir", "final", "cost"} like `run_job`."""
    emit = ConsoleProgress(forward=events) if progress else (events or (lambda event: None))
    with ray_connection(spec, address):
        return RayRunner(spec, emit, progress=False, should_stop=should_stop).run()


__all__ = ["JobCancelled", "RayRunner", "ray_connection", "run_job_on_ray"]
