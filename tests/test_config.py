"""The job spec: every example validates; a mistake raises an error that names the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moedisco.config.loading import INPUT_PATHS, SpecError, build_spec, load_spec, upgrade_saved_spec
from moedisco.config.spec import JobSpec
from moedisco_cli.common import read_spec_file
from tests.conftest import REPO, tiny_spec_dict

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates(path):
    spec = load_spec(path)
    assert spec.model.num_experts >= 2


def test_paper_defaults():
    spec = build_spec({"output_dir": "x", "data": {"train": "corpus.jsonl"}})
    assert (spec.submodel.lr, spec.submodel.schedule) == (1e-4, "constant")
    assert (spec.finetune.lr, spec.finetune.schedule, spec.finetune.warmup_ratio, spec.finetune.weight_decay) == (
        3e-4, "wsd", 0.03, 0.01)
    assert spec.full_parameter.schedule == "cosine"  # the paper's; the fine-tune anneals where it stops instead
    assert spec.full_parameter == spec.finetune.model_copy(update={"schedule": "cosine"})
    assert spec.resources.prices["rtx4090"] == 0.35 and spec.resources.prices["a100"] == 2.28
    # A section given in part keeps its own defaults for the rest, not TrainConfig's.
    partial = build_spec({"output_dir": "x", "data": {"train": "corpus.jsonl"}, "submodel": {"steps": 5},
                          "finetune": {"steps": 5}})
    assert (partial.submodel.lr, partial.submodel.schedule, partial.finetune.schedule) == (1e-4, "constant", "wsd")


BAD_SPECS = [
    ({"data": {"train": "c.jsonl"}}, "output_dir"),
    ({"output_dir": "x"}, "data"),
    ({"output_dir": "x", "data": {"train": "c.jsonl", "eval_fraction": 0.9}}, "data.eval_fraction"),
    ({"output_dir": "x", "data": {"train": "c.jsonl"}, "model": {"num_experts": 1}}, "model.num_experts"),
    ({"output_dir": "x", "data": {"train": "c.jsonl"}, "model": {"arch": "gpt2"}}, "model.arch"),
    ({"output_dir": "x", "data": {"train": "c.jsonl"}, "submodel": {"lerning_rate": 1}}, "submodel.lerning_rate"),
    ({"output_dir": "x", "data": {"train": "c.jsonl"}, "finetune": {"steps": 0}}, "finetune.steps"),
    ({"output_dir": "x", "data": {"train": "c.jsonl"}, "model": {"num_experts": 2, "num_experts_per_tok": 3}},
     "model"),
    ({"output_dir": "x", "data": {"train": "c.jsonl"}, "cluster": {"method": "dbscan"}}, "cluster.method"),
    ({"output_dir": "x", "data": {"train": "c.jsonl"}, "resources": {"prices": {"rtx4090": -1, "a100": 1}}},
     "resources.prices"),
    ({"output_dir": "x", "data": {"train": "c.jsonl"}, "name": "bad name!"}, "name"),
    ({"output_dir": "x", "data": {"train": "c.jsonl"}, "branch": {"sync_rounds": 0}}, "branch.sync_rounds"),
    ({"output_dir": "x", "data": {"train": "c.jsonl"}, "resources": {"max_parallel": 0}}, "resources.max_parallel"),
    ({"output_dir": "x", "data": {"train": "c.jsonl"},
      "resources": {"submodel_tier": {"label": "4090", "device_type": "rtx4090", "gpus_per_worker": -1}}},
     "resources.submodel_tier.gpus_per_worker"),
    ({"output_dir": "x", "data": {"train": "c.jsonl"},
      "resources": {"submodel_tier": {"label": "cpu", "device_type": "cpu", "gpus_per_worker": 1}}},
     "resources.submodel_tier"),
]


@pytest.mark.parametrize("raw,field", BAD_SPECS, ids=[f for _, f in BAD_SPECS])
def test_bad_spec_names_the_field(raw, field):
    with pytest.raises(SpecError) as error:
        build_spec(raw)
    assert f"  {field}" in str(error.value)


def test_more_sync_rounds_than_submodel_steps_is_refused():
    raw = {"output_dir": "x", "data": {"train": "c.jsonl"}, "submodel": {"steps": 3}, "branch": {"sync_rounds": 4}}
    with pytest.raises(SpecError, match=r"branch.sync_rounds \(4\) exceeds submodel.steps \(3\)"):
        build_spec(raw)
    raw["branch"] = {}  # the default number of rounds shrinks to fit instead
    assert build_spec(raw).branch.sync_rounds == 3


def test_a_sharded_batch_must_split_evenly_over_its_workers():
    # Uneven shares would give the workers different numbers of forward passes, and FSDP2's collectives would hang.
    raw = {"output_dir": "x", "data": {"train": "c.jsonl"}, "submodel": {"batch_size": 10},
           "resources": {"workers_per_expert": 4}}
    with pytest.raises(SpecError, match=r"submodel.batch_size \(10\) must be a multiple of the 4 workers"):
        build_spec(raw)
    raw["submodel"] = {"batch_size": 16, "micro_batch_size": 8}
    with pytest.raises(SpecError, match=r"micro_batch_size \(8\) must divide each of the 4 workers' 4 rows"):
        build_spec(raw)
    raw["submodel"]["micro_batch_size"] = 2
    assert build_spec(raw).submodel.micro_batch_size == 2


def test_a_spec_saved_before_sync_rounds_keeps_one_round_and_the_plain_average():
    raw = {"output_dir": "x", "data": {"train": "c.jsonl"}}
    saved = build_spec(raw).model_dump(mode="json")
    del saved["branch"]["sync_rounds"], saved["branch"]["outer_optimizer"]
    older = build_spec(upgrade_saved_spec(saved)).branch  # what the older versions did
    assert older.sync_rounds == 1 and older.outer_optimizer == "average"
    current = build_spec(raw).branch
    assert current.sync_rounds == 4 and current.outer_optimizer == "nesterov" and "branch" not in raw


def test_overrides_and_yaml_round_trip(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("output_dir: out\ndata:\n  train: c.jsonl\n")
    spec = load_spec(path, ["submodel.steps=7", "finetune.lr=3e-5", "merge.router_init=centroid",
                            "model.overrides.rope_theta=10000.0"])
    assert (spec.submodel.steps, spec.finetune.lr, spec.merge.router_init) == (7, 3e-5, "centroid")
    assert spec.model.overrides == {"rope_theta": 10000.0}
    (tmp_path / "again.yaml").write_text(spec.to_yaml())
    assert load_spec(tmp_path / "again.yaml") == spec
    with pytest.raises(SpecError, match="key.path=value"):
        load_spec(path, ["submodel.steps"])
    with pytest.raises(SpecError, match="submodel.steps"):
        load_spec(path, ["submodel.steps=many"])


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")


def test_data_path_relative_to_spec_folder(tmp_path):
    (tmp_path / "corpus.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "spec.yaml").write_text("output_dir: out\ndata:\n  train: corpus.jsonl\n")
    assert load_spec(tmp_path / "spec.yaml").data.train == tmp_path / "corpus.jsonl"
    assert isinstance(JobSpec.model_json_schema()["properties"]["data"], dict)


def test_run_and_submit_find_every_input_beside_the_spec(tmp_path, monkeypatch):
    """`moedisco run` (load_spec) and `moedisco submit` (read_spec_file) resolve the same paths the same way."""
    spec_dir = tmp_path / "specs"
    raw = {"output_dir": "out"}
    for section, field in INPUT_PATHS:
        (spec_dir / f"{section}-{field}").mkdir(parents=True)
        raw.setdefault(section, {})[field] = f"{section}-{field}"
    raw["retire"]["experts"] = [0]
    (spec_dir / "spec.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)  # not beside the spec: only the fallback to the spec's folder finds them
    spec, sent = load_spec(spec_dir / "spec.yaml"), read_spec_file(spec_dir / "spec.yaml", [])
    for section, field in INPUT_PATHS:
        expected = spec_dir / f"{section}-{field}"
        assert getattr(getattr(spec, section), field) == expected
        assert sent[section][field] == str(expected.resolve())


def test_a_tier_asks_for_the_gpus_its_device_type_declares():
    resources = build_spec({"output_dir": "x", "data": {"train": "c.jsonl"}, "resources": {
        "finetune_tier": {"label": "A100", "device_type": "a100", "num_devices": 2, "gpus_per_worker": 0.5},
        "submodel_tier": {"label": "cpu-pool", "device_type": "cpu"}}}).resources
    default = build_spec({"output_dir": "x", "data": {"train": "c.jsonl"}}).resources
    assert default.submodel_tier.gpus_per_worker_needed() == 1 and default.finetune_tier.gpus_per_worker_needed() == 1
    assert resources.submodel_tier.gpus_per_worker_needed() == 0  # `cpu`
    assert resources.finetune_tier.gpus_per_worker_needed() == 0.5  # the explicit override


def test_recipe_auto_sizes_the_phases_from_the_baseline_budget():
    from moedisco.config.recipe import RULE

    budgets = {}
    for steps in (600, 2400):
        spec = build_spec(tiny_spec_dict(Path("x"), recipe="auto", full_parameter={"steps": steps, "batch_size": 8},
                                         submodel={"steps": 7, "batch_size": 4}, finetune={"steps": 7}))
        sequences = steps * 8
        assert spec.submodel.batch_size == 8 // spec.model.num_experts  # the cheap phase steps with B's batch
        assert spec.submodel.steps * spec.model.num_experts * spec.submodel.batch_size == pytest.approx(
            RULE.cheap_share * sequences, abs=8)
        assert spec.finetune.steps * spec.finetune.batch_size == pytest.approx(
            RULE.finetune_share(steps) * sequences, abs=spec.finetune.batch_size)
        assert spec.branch.sync_rounds == max(1, round(spec.submodel.steps / RULE.steps_per_round))
        assert build_spec(yaml.safe_load(spec.to_yaml())) == spec  # the saved spec resolves to itself
        budgets[steps] = spec.submodel.steps
    assert budgets[2400] == pytest.approx(4 * budgets[600], abs=1)  # the cheap phase grows with the budget
    manual = build_spec(tiny_spec_dict(Path("x"), submodel={"steps": 7}))
    assert manual.recipe == "manual" and manual.submodel.steps == 7
    with pytest.raises(SpecError, match="recipe"):
        build_spec(tiny_spec_dict(Path("x"), recipe="automatic"))
