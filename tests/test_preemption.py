"""Checkpoint on notice: SIGTERM checkpoints the step reached, the resumed run loses none; lost work is priced."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moedisco.config.loading import build_spec
from moedisco.config.resources import ResourcesConfig
from moedisco.config.spec import TrainConfig
from moedisco.job.layout import JobPaths, is_done
from moedisco.job.metrics import MetricsWriter
from moedisco.planning.cost import CostLedger
from moedisco.runner.job_runner import JobCancelled, run_job
from moedisco.training.checkpoint import checkpoint_bytes, checkpoint_dir, checkpoint_dirs
from moedisco.training.loop import Preempted, TrainContext, TrainHooks, train
from moedisco.training.preemption import NOTICE_WRITER, PreemptionNotice
from ray_cluster.preemption import failure_config, watch_env
from ray_cluster.simulated import SIMULATED_LABEL
from ray_cluster.tracking import WorkDone
from tests.conftest import tiny_hf_config, tiny_spec_dict

# No periodic checkpoint before the round ends at step 5: only the notice can save step 2.
CFG = TrainConfig(steps=6, batch_size=4, lr=1e-2, eval_every=1, checkpoint_every=100)
ROUND_END = 5


def _train(run_dir, hooks: TrainHooks | None = None, cfg: TrainConfig = CFG):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_hf_config("qwen2_moe"))
    seqs = torch.randint(0, 97, (16, 16), generator=torch.Generator().manual_seed(1))
    context = TrainContext(run_dir, stage="submodel", seed=0, metrics=MetricsWriter(run_dir.parent / "m.jsonl"),
                           hooks=hooks, progress=False, stop_at=ROUND_END)
    return train(model, seqs, None, cfg, context)


def test_sigterm_mid_round_checkpoints_the_step_reached_and_the_resumed_run_loses_none(tmp_path):
    notice = PreemptionNotice()

    def sigterm_at_step_2(record: dict) -> None:  # the signal a spot node's pod gets, delivered to this process
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with notice.on_sigterm(), pytest.raises(Preempted) as stopped:
        _train(tmp_path / "run", TrainHooks(on_progress=sigterm_at_step_2, preempted=notice))
    assert stopped.value.step == 2 and notice.reason == "SIGTERM"
    assert checkpoint_dirs(tmp_path / "run") == [checkpoint_dir(tmp_path / "run", 2)]
    written = stopped.value.checkpoint  # what the log and a Ray trainer's summary report
    assert written.durable and written.step == 2 and written.deadline_s is None and written.seconds > 0
    assert written.num_bytes == checkpoint_bytes(checkpoint_dir(tmp_path / "run", 2)) > 0
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back
    resumed = _train(tmp_path / "run")
    assert resumed.resumed_from == 2 and resumed.steps == ROUND_END  # nothing redone, the round finished
    _train(tmp_path / "whole")
    ours, theirs = (load_file(checkpoint_dir(tmp_path / run, ROUND_END) / "model.safetensors")
                    for run in ("run", "whole"))
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


def test_sigterm_interrupts_a_stage_without_steps_at_once():
    notice = PreemptionNotice()
    began = time.monotonic()
    with notice.on_sigterm(), pytest.raises(Preempted) as stopped:
        with notice.interrupting(lambda why: Preempted(f"{why} during embed", None)):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # an embedding pass that would outlast the grace period
    assert stopped.value.step is None and time.monotonic() - began < 10
    with pytest.raises(Preempted):  # the notice stays: the next such stage does not start either
        with notice.interrupting(lambda why: Preempted(why, None)):
            pass


def test_sigterm_during_the_data_stages_stops_the_job_there_and_a_rerun_goes_on(tmp_path):
    """The local runner's notice covers the whole job: a SIGTERM while a data stage runs stops the job then, not
    at the first training step, and the finished stages stay done."""
    spec = build_spec(tiny_spec_dict(tmp_path / "job"))
    paths = JobPaths(spec.output_dir)

    def sigterm_when_embed_starts(event) -> None:
        if event.event == "stage_started" and event.stage == "embed":
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted, match="embed"):
        run_job(spec, events=sigterm_when_embed_starts, progress=False)
    assert is_done(paths, "prepare") and not is_done(paths, "embed")
    with pytest.raises(JobCancelled):  # the data stages are what this test is about
        run_job(spec, progress=False, should_stop=lambda: is_done(paths, "cluster"))
    assert is_done(paths, "embed") and is_done(paths, "cluster")


def test_restarts_count_the_steps_trained_twice_and_preemptions_lose_none():
    work = WorkDone()
    work.started(resume_step=4)  # the round's trainer starts at a checkpoint
    work.reached = 11  # then reports step 11 and is killed (SIGKILL: no notice)
    work.started(resume_step=8)  # Ray Train restarts it from its checkpoint at 8: steps 9-11 are redone
    work.reached, work.preemptions = 15, 1  # then checkpointed step 15 on a notice
    work.started(resume_step=15)
    assert work.summary(final_step=20) == {"lost_steps": 3, "steps_run": 19, "preemptions": 1}


def test_the_ledger_prices_lost_steps_per_round(tmp_path):
    resources = ResourcesConfig()
    ledger = CostLedger(tmp_path / "cost.json", resources)
    tier = resources.submodel_tier
    ledger.record("submodel", tier, 3600.0, "cuda:0", expert=1, round_index=0,
                  work={"lost_steps": 3, "steps_run": 12, "preemptions": 1})
    row = ledger.record("submodel", tier, 1800.0, "cuda:0", expert=1, round_index=1,
                        work={"lost_steps": 0, "steps_run": 10, "preemptions": 2})
    price = resources.prices[tier.device_type]
    assert row.usd == pytest.approx(1.5 * price) and row.lost_steps == 3 and row.preemptions == 3
    assert row.lost_usd == pytest.approx(price * 3 / 12)
    again = ledger.record("submodel", tier, 3600.0, "cuda:0", expert=1, round_index=0)  # round 0 re-run cleanly
    assert again.lost_steps == 0 and again.lost_usd == 0.0 and again.preemptions == 2
    assert CostLedger(tmp_path / "cost.json", resources).summary()["lost_usd"] == 0.0


def test_a_notice_checkpoint_past_its_deadline_is_not_waited_for_and_lands_whole_or_not_at_all(tmp_path):
    """Storage too slow for the notice: the run stops at its deadline, saying the checkpoint is not on storage; the
    newest one that is (the periodic step 2) is what a restart would resume from; the late write then lands whole,
    and a resume takes it."""
    cfg = CFG.model_copy(update={"checkpoint_every": 2})
    run = tmp_path / "run"

    def slow_storage() -> None:  # the claim check before every write; only the notice's writer is slow
        if threading.current_thread().name == NOTICE_WRITER:
            time.sleep(1.5)

    hooks = TrainHooks(preempted=lambda: checkpoint_dirs(run) != [], notice_seconds=lambda: 0.2,
                       before_write=slow_storage)
    with pytest.raises(Preempted, match="not in time") as stopped:
        _train(run, hooks, cfg)
    written = stopped.value.checkpoint
    assert (written.step, written.durable, written.num_bytes, written.deadline_s) == (3, False, 0, 0.2)
    assert written.seconds < 1.0 and checkpoint_dirs(run) == [checkpoint_dir(run, 2)]
    for late in [t for t in threading.enumerate() if t.name == NOTICE_WRITER]:
        late.join()
    assert checkpoint_dirs(run) == [checkpoint_dir(run, 2), checkpoint_dir(run, 3)]
    assert _train(run, cfg=cfg).resumed_from == 3


def _node(labels: dict) -> dict:
    return {"NodeID": "n", "Alive": True, "Labels": labels}


def test_a_job_on_spot_nodes_gets_the_fast_preemption_watcher_without_a_flag(monkeypatch):
    """Spot is found from the nodes' labels (market=spot, KubeRay's ray.io/market-type) and, for a tier of real
    nodes, from its spot node groups; the local simulated cluster's nodes are spot only when labelled so."""
    monkeypatch.delenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", raising=False)  # the Ray tests' setting
    spec = build_spec(tiny_spec_dict("/tmp/unused"))
    simulated = {"gpu_type": "4090", SIMULATED_LABEL[0]: SIMULATED_LABEL[1]}
    assert watch_env(spec, [_node(simulated)]) is None
    fast = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1", "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"}
    assert watch_env(spec, [_node({**simulated, "market": "spot"})]) == fast
    assert watch_env(spec, [_node({"gpu_type": "4090", "ray.io/market-type": "spot"})]) == fast
    assert watch_env(spec, []) == fast  # no node yet: the default cheap-4090-spot group may add them
    no_spot = build_spec(tiny_spec_dict("/tmp/unused", resources={"node_groups": {"cheap-4090-spot": None}}))
    assert watch_env(no_spot, [_node({"gpu_type": "4090", "market": "on-demand"})]) is None
    assert watch_env(no_spot, [_node({"gpu_type": "A100", "market": "spot"})]) == fast  # the fine-tune's tier
    config = failure_config(build_spec(tiny_spec_dict("/tmp/unused", resources={"max_preemptions": 5})).resources)
    assert (config.max_failures, config.max_preemption_failures) == (3, 5)
    assert failure_config(spec.resources).max_preemption_failures == -1  # unset: Ray Train's "no limit"
