"""The whole job, in process, on the bundled corpus with a tiny Qwen2-MoE: losses fall, outputs load, it resumes."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moedisco.config.loading import build_spec
from moedisco.job.layout import JobPaths
from moedisco.job.metrics import MetricsWriter, read_metrics
from moedisco.job.registry import STAGE, Task, plan
from moedisco.models.architecture import parameter_roles, read_config
from moedisco.runner.job_runner import check_same_job, run_job
from moedisco.stages.finetune import anneal
from moedisco.stages.stage_run import StageRun
from moedisco.stages.sync import stage_sync
from moedisco.training.checkpoint import checkpoint_dir
from moedisco.training.loop import StopRequested
from tests.conftest import tiny_spec_dict

pytestmark = pytest.mark.slow


def _first_last(records, **match):
    rows = [r for r in records if all(r.get(k) == v for k, v in match.items()) and r.get("eval_loss") is not None]
    return rows[0]["eval_loss"], rows[-1]["eval_loss"]


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
    spec = build_spec(tiny_spec_dict(tmp_path_factory.mktemp("job") / "out"))
    events = []
    summary = run_job(spec, events=events.append, progress=False)
    return spec, summary, events


def test_losses_fall_in_every_training_stage(finished_job):
    spec, _, _ = finished_job
    records = read_metrics(spec.output_dir / "metrics.jsonl")
    for expert in range(spec.model.num_experts):
        first, last = _first_last(records, stage="submodel", expert=expert)
        assert last < first - 0.2, f"submodel {expert}: {first} -> {last}"
    first, last = _first_last(records, stage="finetune")
    assert last < first
    assert {r["stage"] for r in records} >= {"embed", "cluster", "submodel", "merge", "finetune"}
    required = {"stage", "step", "tokens", "loss", "eval_loss", "seconds", "device"}
    assert all(required <= set(r) for r in records if r["stage"] in ("submodel", "finetune"))


def test_every_training_stage_records_its_peak_memory_and_measures(finished_job):
    spec, _, _ = finished_job
    paths = JobPaths(spec.output_dir)
    trained = [task for group in plan(spec) for task in group if STAGE[task.stage].trained]
    for task in trained:
        summary = json.loads((paths.markers / f"{task.marker}.json").read_text())
        # A tiny model on the CPU: above nothing, below what a 2-core CI runner could hold.
        assert 0 < summary["peak_memory_gb"] < 4, task
        assert summary["memory_measures"]["precision"] == spec.submodel.precision
    records = [r for r in read_metrics(paths.metrics) if STAGE[r["stage"]].trained]
    assert records and all(r["peak_memory_gb"] is not None and "memory_measures" in r for r in records)


def test_outputs_are_standard_hugging_face_folders(finished_job):
    spec, summary, _ = finished_job
    for folder in ("merged", "final"):
        model = AutoModelForCausalLM.from_pretrained(spec.output_dir / folder)
        assert model.config.num_experts == spec.model.num_experts
    assert (spec.output_dir / "final" / "tokenizer.json").is_file()
    assert (spec.output_dir / "report.png").stat().st_size > 10_000
    saved = (spec.output_dir / "spec.yaml").read_text()
    assert "num_experts: 4" in saved


def test_every_stage_left_what_it_declares_and_its_marker(finished_job):
    spec, _, _ = finished_job
    paths = JobPaths(spec.output_dir)
    for task in (task for group in plan(spec) for task in group):
        assert (paths.markers / f"{task.marker}.json").is_file()
        for name in STAGE[task.stage].writes:
            assert getattr(paths, name).exists(), f"{task.stage} declares {name}"


def test_cost_ledger_prices_every_stage(finished_job):
    spec, summary, _ = finished_job
    cost = json.loads((spec.output_dir / "cost.json").read_text())
    stages = [(r["stage"], r["expert"]) for r in cost["stages"]]
    assert [("submodel", k) in stages for k in range(4)] == [True] * 4 and ("finetune", None) in stages
    finetune = next(r for r in cost["stages"] if r["stage"] == "finetune")
    assert finetune["tier"] == "A100" and finetune["price_per_hour"] == 2.28 and finetune["simulated"] is True
    assert cost["total_usd"] == pytest.approx(sum(r["usd"] for r in cost["stages"]))
    assert summary["cost"]["total_usd"] > 0


def test_rerun_skips_finished_stages(finished_job):
    spec, _, _ = finished_job
    events = []
    run_job(spec, events=events.append, progress=False)
    assert {e.event for e in events} == {"stage_skipped"}


def test_interrupted_stage_resumes_from_checkpoint(tmp_path):
    spec = build_spec(tiny_spec_dict(tmp_path / "out", model={"num_experts": 2, "num_experts_per_tok": 1},
                                     branch={"sync_rounds": 1}))
    second = spec.output_dir / "submodels" / "1" / "checkpoints" / "step_00000004"

    def stop_in_second_submodel():  # polled before each stage and after each checkpoint
        return second.is_dir()

    with pytest.raises(StopRequested):
        run_job(spec, progress=False, should_stop=stop_in_second_submodel)
    assert (spec.output_dir / "submodels" / "1" / "checkpoints" / "step_00000004").is_dir()
    events = []
    run_job(spec, events=events.append, progress=False)
    finished = {(e.stage, e.expert): e.summary for e in events if e.event == "stage_finished"}
    assert ("submodel", 0) not in finished  # it was done before the interruption
    assert finished[("submodel", 1)]["resumed_from"] == 4
    steps = [r["step"] for r in read_metrics(spec.output_dir / "metrics.jsonl", "submodel") if r["expert"] == 1]
    assert steps == [0, 4, 8, 12]


def test_a_stopped_finetune_is_annealed_where_it_stopped(tmp_path):
    """`anneal`: the wsd fine-tune's stable checkpoint decayed beside the job, which is left as it was."""
    spec = build_spec(tiny_spec_dict(tmp_path / "out", model={"num_experts": 2, "num_experts_per_tok": 1},
                                     branch={"sync_rounds": 1}, finetune={"schedule": "wsd"}))
    paths = JobPaths(spec.output_dir)
    stable = checkpoint_dir(paths.run_dir("finetune"), 4)
    assert spec.finetune.schedule == "wsd" and spec.finetune.steps == 8  # decays over steps 6..8
    with pytest.raises(StopRequested):
        run_job(spec, progress=False, should_stop=stable.is_dir)
    _, result = anneal(paths, 4)
    assert (result.resumed_from, result.steps) == (4, 5) and result.eval_loss is not None
    annealed = load_file(paths.root / "anneal" / "step_4" / "model.safetensors")
    assert any(not torch.equal(annealed[name], tensor) for name, tensor in
               load_file(stable / "model.safetensors").items())
    assert stable.is_dir() and max(r["step"] for r in read_metrics(paths.metrics, "finetune")) == 4
    assert [r["step"] for r in read_metrics(paths.root / "anneal" / "step_4" / "metrics.jsonl")] == [5]


def test_full_parameter_baseline(tmp_path):
    spec = build_spec(tiny_spec_dict(tmp_path / "out", method="full_parameter"))
    run_job(spec, progress=False)
    records = read_metrics(spec.output_dir / "metrics.jsonl", "full_parameter")
    first, last = _first_last(records, stage="full_parameter")
    assert last < first - 0.2
    assert "router_load" in records[-1] and len(records[-1]["router_load"]) == 4
    AutoModelForCausalLM.from_pretrained(spec.output_dir / "final")


def test_changed_identity_is_refused(finished_job):
    spec, _, _ = finished_job
    changed = spec.model_copy(update={"seed": 5})
    with pytest.raises(ValueError, match="seed"):
        run_job(changed, progress=False)


def test_a_job_saved_before_sync_rounds_existed_resumes_only_as_one_round(tmp_path):
    spec = build_spec(tiny_spec_dict(tmp_path / "out"))
    saved = spec.model_dump(mode="json")
    del saved["branch"]["sync_rounds"]
    spec.output_dir.mkdir(parents=True)
    (spec.output_dir / "spec.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ValueError, match=r"different branch.sync_rounds \(1 there, 4 here\)\. Set them back"):
        check_same_job(spec, JobPaths(spec.output_dir))
    check_same_job(build_spec(tiny_spec_dict(tmp_path / "out", branch={"sync_rounds": 1})), JobPaths(spec.output_dir))


def test_with_sync_rounds_the_submodel_steps_are_part_of_the_job(tmp_path):
    spec = build_spec(tiny_spec_dict(tmp_path / "out", branch={"sync_rounds": 3}))
    spec.save(spec.output_dir / "spec.yaml")
    longer = build_spec(tiny_spec_dict(tmp_path / "out", branch={"sync_rounds": 3}, submodel={"steps": 18}))
    with pytest.raises(ValueError, match=r"submodel.steps \(12 there, 18 here\)"):  # the rounds would end elsewhere
        check_same_job(longer, JobPaths(spec.output_dir))
    one_round = build_spec(tiny_spec_dict(tmp_path / "one", branch={"sync_rounds": 1}))
    one_round.save(one_round.output_dir / "spec.yaml")
    check_same_job(one_round.model_copy(update={"submodel": longer.submodel}), JobPaths(one_round.output_dir))


def test_moe_disco_only_settings_do_not_make_a_baseline_another_job(tmp_path):
    baseline = build_spec(tiny_spec_dict(tmp_path / "out", method="full_parameter"))
    baseline.save(baseline.output_dir / "spec.yaml")
    other = build_spec(tiny_spec_dict(tmp_path / "out", method="full_parameter", cluster={"method": "random"},
                                      branch={"warmup_steps": 5}))
    check_same_job(other, JobPaths(baseline.output_dir))
    with pytest.raises(ValueError, match="different seed"):
        check_same_job(other.model_copy(update={"seed": 3}), JobPaths(baseline.output_dir))


def test_shared_warmup_then_branch_fisher_merge_and_diagnostics(tmp_path):
    spec = build_spec(tiny_spec_dict(tmp_path / "out", branch={"warmup_steps": 8}, merge={"weighting": "fisher"},
                                     model={"num_experts": 2, "num_experts_per_tok": 1}))
    events = []
    run_job(spec, events=events.append, progress=False)
    finished = {(e.stage, e.expert): e.summary for e in events if e.event == "stage_finished"}
    assert finished[("warmup", None)]["steps"] == 8
    branched = load_file(spec.output_dir / "branched" / "model.safetensors")
    warm = load_file(spec.output_dir / "runs" / "warmup" / "model.safetensors")
    experts = branched["model.layers.0.mlp.experts.down_proj"]
    assert torch.equal(experts[0], experts[1]) and torch.equal(experts[:1], warm["model.layers.0.mlp.experts.down_proj"])
    assert torch.equal(branched["model.embed_tokens.weight"], warm["model.embed_tokens.weight"])
    for expert in (0, 1):
        assert finished[("submodel", expert)]["cluster_eval_loss"] is not None
    merge_record = read_metrics(spec.output_dir / "metrics.jsonl", "merge")[-1]
    assert merge_record["oracle_eval_loss"] is not None and merge_record["eval_loss"] is not None
    # Fisher merge: every shared element is a convex combination of the submodels' copies, but not their
    # sample-weighted mean (the weights differ element by element).
    name = "model.embed_tokens.weight"
    copies = torch.stack([load_file(spec.output_dir / "submodels" / str(k) / "model.safetensors")[name]
                          for k in (0, 1)])
    assert all((spec.output_dir / "submodels" / str(k) / "second_moment.safetensors").is_file() for k in (0, 1))
    merged = load_file(spec.output_dir / "merged" / "model.safetensors")[name]
    assert (merged >= copies.min(0).values - 1e-6).all() and (merged <= copies.max(0).values + 1e-6).all()
    plain = sum(w * c for w, c in zip(merge_record["weights"], copies))
    assert not torch.allclose(merged, plain, atol=1e-6)


def test_moe_warmup_branches_from_the_trained_moe(tmp_path):
    spec = build_spec(tiny_spec_dict(tmp_path / "out", branch={"warmup_steps": 4, "warmup_model": "moe"},
                                     model={"num_experts": 2, "num_experts_per_tok": 1}))
    run_job(spec, progress=False)
    source = load_file(spec.output_dir / "source" / "model.safetensors")
    branched = load_file(spec.output_dir / "branched" / "model.safetensors")
    assert branched.keys() == source.keys()
    gate, experts = "model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.down_proj"
    assert not torch.equal(branched[gate], source[gate])  # the router trained with the experts
    assert not torch.equal(branched[experts][0], branched[experts][1])  # experts start different
    first_submodel = load_file(spec.output_dir / "submodels" / "0" / "model.safetensors")
    assert first_submodel[experts].shape[0] == 1


def test_sync_rounds_average_backbones_between_rounds_and_resume_across_them(tmp_path):
    spec = build_spec(tiny_spec_dict(tmp_path / "out", branch={"sync_rounds": 3},
                                     model={"num_experts": 2, "num_experts_per_tok": 1}))
    out = spec.output_dir

    def stop_at_the_end_of_expert_1s_second_round():  # polled before each stage and after each checkpoint
        return (out / "submodels" / "1" / "checkpoints" / "step_00000008").is_dir()

    with pytest.raises(StopRequested):
        run_job(spec, progress=False, should_stop=stop_at_the_end_of_expert_1s_second_round)
    # Round 1 started from the average: both experts' step-4 checkpoints hold the same backbone, their own experts.
    step4 = [load_file(out / "submodels" / str(k) / "checkpoints" / "step_00000004" / "model.safetensors")
             for k in (0, 1)]
    roles = parameter_roles(read_config(out / "source"))
    assert all(torch.equal(step4[0][name], step4[1][name]) == (roles[name] == "shared") for name in step4[0])
    assert not (out / "sync" / "round_0.safetensors").exists()  # the copy kept for re-running the sync is gone
    with pytest.raises(ValueError, match="newest checkpoint is step_00000008, not step_00000004"):
        stage_sync(StageRun(spec, JobPaths(out), MetricsWriter(out / "metrics.jsonl"), Task("sync", round=0)))

    events = []
    run_job(spec, events=events.append, progress=False)
    finished = [(e.stage, e.expert, e.round) for e in events if e.event == "stage_finished"]
    assert finished[:4] == [("submodel", 1, 1), ("sync", None, 1), ("submodel", 0, 2), ("submodel", 1, 2)]
    for k in (0, 1):  # every step logged once: each round continued where the previous one stopped
        steps = [r["step"] for r in read_metrics(out / "metrics.jsonl", "submodel") if r["expert"] == k]
        assert steps == [0, 4, 8, 12]
    syncs = read_metrics(out / "metrics.jsonl", "sync")
    assert [r["step"] for r in syncs] == [4, 8] and all(r["divergence"] > 0 for r in syncs)
    cost = json.loads((out / "cost.json").read_text())
    submodel_rows = [r for r in cost["stages"] if r["stage"] == "submodel"]
    assert len(submodel_rows) == 2 and all(set(r["rounds"]) == {"0", "1", "2"} for r in submodel_rows)
    assert all(r["seconds"] == pytest.approx(sum(r["rounds"].values()), abs=1e-3) for r in submodel_rows)
    assert (out / "final" / "config.json").is_file()
