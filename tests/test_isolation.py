"""Jobs stay isolated and resumable: one runner writes a job folder, state files survive torn writes, and two jobs of
one name never share Ray's folders. In process, on the bundled corpus with a tiny Qwen2-MoE."""

from __future__ import annotations

import json
import shutil

import pytest

from moedisco.config.loading import build_spec
from moedisco.job.layout import ClaimLost, JobPaths, claim, claimant_of
from moedisco.job.metrics import read_metrics
from moedisco.runner.job_runner import run_job
from moedisco.training.checkpoint import checkpoint_dirs
from moedisco.training.loop import StopRequested
from tests.conftest import tiny_spec_dict

TWO_EXPERTS = {"model": {"num_experts": 2, "num_experts_per_tok": 1}, "branch": {"sync_rounds": 1}}


def test_a_runner_that_was_replaced_stops_before_it_writes_again(tmp_path):
    spec = build_spec(tiny_spec_dict(tmp_path / "out", **TWO_EXPERTS))
    paths = JobPaths(spec.output_dir)
    first_checkpoint = paths.submodel(0) / "checkpoints" / "step_00000004"

    def take_over_at_the_first_checkpoint() -> bool:  # what a relaunched runner does first
        if first_checkpoint.is_dir() and claimant_of(paths) == "a":
            claim(paths, "b")
        return False

    with pytest.raises(ClaimLost, match="now belongs to runner b"):
        run_job(spec, progress=False, runner_id="a", should_stop=take_over_at_the_first_checkpoint)
    # Runner a stopped before its next write: no metrics line, checkpoint or marker after the takeover.
    assert [r["step"] for r in read_metrics(paths.metrics, "submodel")] == [0, 4]
    assert [d.name for d in checkpoint_dirs(paths.submodel(0))] == ["step_00000004"]
    assert not paths.marker("submodel_0").exists()
    summary = run_job(spec, progress=False, runner_id="b")
    assert json.loads(paths.marker("submodel_0").read_text())["resumed_from"] == 4
    assert claimant_of(paths) == "b" and (paths.final / "config.json").is_file() and summary["cost"]["total_usd"] > 0


def test_a_folder_with_torn_state_files_resumes_and_finishes(tmp_path, caplog):
    spec = build_spec(tiny_spec_dict(tmp_path / "out", **TWO_EXPERTS))
    paths = JobPaths(spec.output_dir)
    second = paths.submodel(1) / "checkpoints" / "step_00000004"
    with pytest.raises(StopRequested):
        run_job(spec, progress=False, should_stop=second.is_dir)
    # A crash of an older moedisco mid-write, an interrupted checkpoint restore, concurrent appends on NFS:
    marker = paths.marker("submodel_0")
    marker.write_text(marker.read_text()[:20])
    partial = second.with_name("step_00000008.partial")
    shutil.copytree(second, partial)  # complete files, but never renamed into place
    with paths.metrics.open("a") as handle:
        handle.write('{"stage": "submodel", "expert": 1, "st\n')
    assert checkpoint_dirs(paths.submodel(1)) == [second]

    events = []
    run_job(spec, progress=False, events=events.append)
    finished = {(e.stage, e.expert): e.summary for e in events if e.event == "stage_finished"}
    assert finished[("submodel", 0)]["steps"] == 12  # re-marked from its finished run, not retrained
    assert finished[("submodel", 1)]["resumed_from"] == 4  # the partial step 8 was never resumed from
    assert (paths.final / "config.json").is_file()
    assert "skipped 1 torn line" in caplog.text


def test_two_jobs_of_one_name_on_one_storage_path_keep_separate_ray_folders(tmp_path):
    from moedisco.job.registry import Task
    from ray_cluster.placement import job_storage, run_name

    storage = {"storage_path": str(tmp_path / "shared")}
    first, second = (build_spec(tiny_spec_dict(tmp_path / folder, resources=storage)) for folder in ("a", "b"))
    assert first.name == second.name
    assert job_storage(first) != job_storage(second) and job_storage(first).parent == tmp_path / "shared"
    assert run_name(first, Task("submodel", 0)) != run_name(second, Task("submodel", 0))
    again = build_spec(tiny_spec_dict(tmp_path / "a", resources=storage))
    assert job_storage(again) == job_storage(first)  # a re-run of the job finds its own files


def _losses(spec) -> list[tuple]:
    return [(r["stage"], r.get("expert"), r["step"], r["eval_loss"])
            for r in read_metrics(JobPaths(spec.output_dir).metrics) if r.get("eval_loss") is not None]


def test_a_jobs_results_do_not_depend_on_what_ran_before_it_in_the_process(tmp_path):
    """Random cluster assignment and the centroid router (the case issue 13 saw drift in), run first and then again
    after a full-parameter job and with every global generator (Python, NumPy, torch) moved elsewhere."""
    import random

    import numpy as np
    import torch

    short = {"steps": 4, "eval_every": 4, "checkpoint_every": 4}
    sections = dict(TWO_EXPERTS, cluster={"method": "random"}, merge={"router_init": "centroid"},
                    submodel=short, finetune=short)
    first = build_spec(tiny_spec_dict(tmp_path / "first", **sections))
    run_job(first, progress=False)
    run_job(build_spec(tiny_spec_dict(tmp_path / "other", method="full_parameter", full_parameter=short)),
            progress=False)
    random.seed(7), np.random.seed(7), torch.manual_seed(7), torch.rand(123)
    again = build_spec(tiny_spec_dict(tmp_path / "again", **sections))
    run_job(again, progress=False)
    assert _losses(again) == _losses(first) and len(_losses(first)) > 4
