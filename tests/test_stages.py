"""The stage table (`moedisco.job.registry`): every runner, the metrics, the ledger and the service read it, so its
plan must be consistent with what each stage declares it reads and writes."""

from __future__ import annotations

import pytest

from moedisco.config.loading import build_spec
from moedisco.job.layout import JobPaths
from moedisco.job.registry import STAGE, STAGES, Task, plan, submodel_task, tier_of
from moedisco.runner.execute import STAGE_FUNCTIONS
from tests.conftest import tiny_spec_dict


def _spec(tmp_path, **sections):
    return build_spec(tiny_spec_dict(tmp_path / "out", **sections))


@pytest.mark.parametrize("sections", [{}, {"branch": {"sync_rounds": 3, "warmup_steps": 4}},
                                      {"branch": {"sync_rounds": 1}}, {"method": "full_parameter"}])
def test_every_stage_reads_only_what_an_earlier_group_wrote(tmp_path, sections):
    written: set[str] = set()
    for group in plan(_spec(tmp_path, **sections)):
        for task in group:
            missing = set(STAGE[task.stage].reads) - written
            assert not missing, f"{task.stage} reads {missing} before any stage writes it"
        written |= {name for task in group for name in STAGE[task.stage].writes}


def test_the_plan_matches_the_declarations(tmp_path):
    spec = _spec(tmp_path, branch={"sync_rounds": 3})
    tasks = [task for group in plan(spec) for task in group]
    markers = [task.marker for task in tasks]
    assert len(markers) == len(set(markers)), "two tasks would share a stage marker"
    for task in tasks:
        declared = STAGE[task.stage]
        assert (task.expert is not None) == declared.per_expert
        assert (task.round is not None) == declared.per_round
    groups = plan(spec)
    rounds = [group for group in groups if group[0].stage == "submodel"]
    assert len(rounds) == 3 and all(len(group) == spec.model.num_experts for group in rounds)
    assert [t.marker for t in rounds[-1]] == [f"submodel_{k}" for k in range(spec.model.num_experts)]
    assert rounds[0][1] == submodel_task(spec, 1, 0) and rounds[0][1].marker == "submodel_1_round_0"
    assert [g[0] for g in groups if g[0].stage == "sync"] == [Task("sync", round=0), Task("sync", round=1)]


def test_declared_paths_functions_and_tiers_exist(tmp_path):
    spec, paths = _spec(tmp_path), JobPaths(tmp_path)
    for stage in STAGES:
        assert callable(STAGE_FUNCTIONS[stage.name])
        for name in (*stage.reads, *stage.writes):
            assert isinstance(getattr(paths, name), type(tmp_path)), f"{stage.name}: JobPaths has no {name}"
        assert (stage.train_config is not None) == stage.trained
        if stage.trained:
            assert getattr(spec, stage.train_config).steps > 0
        assert tier_of(spec.resources, stage.name) == getattr(spec.resources, stage.tier)
    assert tier_of(spec.resources, "finetune") == spec.resources.finetune_tier

