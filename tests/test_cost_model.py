"""The cost model of `moedisco estimate`: FLOPs at each device's stated efficiency, recomputation, the warm-up,
and the paper's measured-hours convention (Table 3)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from moedisco.config.loading import build_spec, load_spec
from moedisco.config.resources import DeviceSpec, ResourcesConfig
from moedisco.planning.cost import flop_cost_usd
from moedisco.planning.estimate import EstimateError, estimate_job, measured_cost
from tests.conftest import REPO, tiny_spec_dict

A100 = DeviceSpec(memory_gb=80, bf16_tflops=100.0, efficiency=0.5)


def test_flops_are_six_per_parameter_and_token_and_eight_when_the_forward_is_recomputed():
    plain = flop_cost_usd(active_params=1_000_000_000, tokens=1_000_000, device=A100, price=3.6)
    assert plain["flops"] == 6e15 and plain["seconds"] == pytest.approx(120.0) and plain["usd"] == pytest.approx(0.12)
    recomputed = flop_cost_usd(1_000_000_000, 1_000_000, A100, 3.6, recompute=True)
    assert recomputed["flops"] == 8e15 and recomputed["usd"] == pytest.approx(0.16)
    faster = flop_cost_usd(1_000_000_000, 1_000_000, A100.model_copy(update={"efficiency": 1.0}), 3.6)
    assert faster["seconds"] == pytest.approx(60.0)  # twice the achieved fraction of peak: half the time


def test_each_device_states_its_efficiency_and_a_spec_may_change_it():
    devices = ResourcesConfig().devices
    assert devices["rtx4090"].efficiency == 0.3 and devices["a100"].efficiency == 0.4
    changed = ResourcesConfig(devices={"rtx4090": {"efficiency": 0.45}, "h100": {"memory_gb": 80, "bf16_tflops": 989}})
    assert changed.devices["rtx4090"].efficiency == 0.45 and changed.devices["rtx4090"].memory_gb == 24
    assert changed.devices["h100"].efficiency == 0.4  # a device without a stated one gets the documented default
    for bad in (0.0, 1.5):
        with pytest.raises(ValidationError, match="efficiency"):
            ResourcesConfig(devices={"a100": {"efficiency": bad}})


def _tiny(tmp_path, **sections):
    return build_spec(tiny_spec_dict(tmp_path / "out", **sections))


def test_the_estimate_prices_each_stage_at_its_devices_efficiency(tmp_path):
    base = estimate_job(_tiny(tmp_path))["cost"]
    quick = estimate_job(_tiny(tmp_path, resources={"devices": {"a100": {"efficiency": 0.8}}}))["cost"]
    assert quick["finetune_usd"] == pytest.approx(base["finetune_usd"] / 2)
    assert quick["full_parameter_usd"] == pytest.approx(base["full_parameter_usd"] / 2)
    assert quick["submodels_usd"] == pytest.approx(base["submodels_usd"])  # the cheap tier is unchanged
    assert "rtx4090 at 30%" in base["model"] and "a100 at 40%" in base["model"]
    assert "a100 at 80%" in quick["model"]


def test_a_stage_that_checkpoints_its_activations_is_priced_with_the_recomputed_forward():
    spec = load_spec(REPO / "examples" / "qwen1.5-moe-a2.7b.yaml")
    result = estimate_job(spec)
    counts, stages = result["parameters"], result["cost"]["stages"]
    tokens = spec.submodel.steps * spec.submodel.batch_size * spec.data.sequence_length
    assert result["plan"]["submodel"]["measures"]["activation_checkpointing"]  # the planner turned it on for a 4090
    assert stages["submodel"]["recompute"] and stages["submodel"]["flops"] == 8 * counts["submodel"] * tokens
    assert not result["plan"]["finetune"]["measures"]["activation_checkpointing"]
    assert not stages["finetune"]["recompute"]
    assert stages["finetune"]["flops"] == 6 * counts["active"] * spec.finetune.steps * 16 * 1024
    assert "recomputed: submodel" in result["cost"]["model"]


def test_the_baseline_of_a_moe_disco_job_is_priced_with_the_measures_it_would_train_with(tmp_path):
    spec = _tiny(tmp_path, full_parameter={"activation_checkpointing": True})
    stages = estimate_job(spec)["cost"]["stages"]
    assert stages["full_parameter"]["recompute"] and not stages["finetune"]["recompute"]


@pytest.mark.parametrize("warmup_model, params", [("dense", "submodel"), ("moe", "active")])
def test_the_warmup_is_priced_on_the_cheap_tier(tmp_path, warmup_model, params):
    spec = _tiny(tmp_path, branch={"warmup_steps": 30, "warmup_model": warmup_model})
    result = estimate_job(spec)
    cost, warmup = result["cost"], result["cost"]["stages"]["warmup"]
    assert warmup["device_type"] == "rtx4090" and warmup["params"] == result["parameters"][params]
    assert warmup["tokens"] == 30 * spec.submodel.batch_size * spec.data.sequence_length
    assert cost["warmup_usd"] == warmup["usd"] > 0
    assert cost["total_usd"] == pytest.approx(cost["warmup_usd"] + cost["submodels_usd"] + cost["finetune_usd"])
    without = estimate_job(_tiny(tmp_path, branch={"warmup_steps": 0}))["cost"]
    assert without["warmup_usd"] == 0.0 and "warmup" not in without["stages"]


# Table 3 of the paper: measured hours (full-parameter, slowest submodel, fine-tune) and the dollars it reports.
TABLE_3 = {  # (model, dataset): (baseline h, S-time h, F-time h), (baseline $, S-cost $, F-cost $, total $)
    ("qwen", "c4"): ((9.87, 2.09, 1.73), (22.5036, 2.9260, 3.9444, 6.8704)),
    ("qwen", "wiki"): ((3.04, 1.28, 0.68), (6.9312, 1.7920, 1.5504, 3.3424)),
    ("qwen", "openwebtext"): ((13.12, 3.12, 2.87), (29.9136, 4.3680, 6.5436, 10.9116)),
    ("llama", "c4"): ((5.64, 1.54, 2.01), (12.8592, 2.1560, 4.5828, 6.7388)),
    ("llama", "wiki"): ((7.45, 1.46, 2.67), (16.9860, 2.0440, 6.0876, 8.1316)),
    ("llama", "openwebtext"): ((14.09, 3.01, 4.79), (32.1252, 4.2140, 10.9212, 15.1352)),
}
EXAMPLES = {"qwen": "qwen1.5-moe-a2.7b.yaml", "llama": "llama-moe-3.5b.yaml"}


@pytest.mark.parametrize("row", TABLE_3, ids="-".join)
def test_the_paper_convention_reproduces_table_3(row):
    (baseline_h, slowest_h, finetune_h), dollars = TABLE_3[row]
    spec = load_spec(REPO / "examples" / EXAMPLES[row[0]])  # 4 experts, the default $0.35 and $2.28 per hour
    cost = measured_cost(spec, {"submodel": slowest_h, "finetune": finetune_h, "full_parameter": baseline_h})
    got = (cost["full_parameter_usd"], cost["submodels_usd"], cost["finetune_usd"], cost["total_usd"])
    assert got == pytest.approx(dollars, abs=5e-5)  # to the table's fourth decimal, so to the cent
    assert cost["total_hours"] == pytest.approx(slowest_h + finetune_h)  # the table's Total Time


def test_the_command_line_prices_measured_hours(tmp_path):
    from typer.testing import CliRunner

    from moedisco_cli.main import app

    args = ["estimate", str(REPO / "examples" / "qwen1.5-moe-a2.7b.yaml"), "--json",
            "--hours", "submodel=2.09", "--hours", "finetune=1.73", "--hours", "full_parameter=9.87"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    cost = json.loads(result.output)["cost"]
    assert cost["convention"] == "paper" and round(cost["total_usd"], 2) == 6.87
    assert round(cost["full_parameter_usd"], 2) == 22.50 and "4 x the slowest" in cost["model"]


@pytest.mark.parametrize("hours, message", [
    (["foo=1"], "unknown stage 'foo'"),
    (["submodel=-1", "finetune=1", "full_parameter=1"], "submodel must be a finite number >= 0"),
    (["submodel=abc"], "'abc' is not a number"),
    (["submodel"], "expected STAGE=HOURS"),
    (["submodel=1", "submodel=2"], "submodel is given twice"),
    (["submodel=1"], r"missing: finetune, full_parameter"),
])
def test_bad_hours_are_refused_naming_what_is_wrong(tmp_path, hours, message):
    from typer.testing import CliRunner

    from moedisco_cli.main import app

    (tmp_path / "spec.yaml").write_text(_tiny(tmp_path).to_yaml())
    args = ["estimate", str(tmp_path / "spec.yaml")] + [arg for item in hours for arg in ("--hours", item)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and message.replace("\\", "") in " ".join(result.output.split()), result.output


def test_conventions_and_hours_must_agree(tmp_path):
    spec = _tiny(tmp_path, branch={"warmup_steps": 10})
    hours = {"submodel": 1.0, "finetune": 1.0, "full_parameter": 2.0}
    with pytest.raises(EstimateError, match="only under the `paper` convention"):
        estimate_job(spec, hours=hours, convention="flop")
    with pytest.raises(EstimateError, match="unknown cost convention 'fast'"):
        estimate_job(spec, convention="fast")
    with pytest.raises(EstimateError, match="missing: warmup"):  # the spec warms up: its hours are needed too
        estimate_job(spec, hours=hours)
    cost = estimate_job(spec, hours={**hours, "warmup": 0.5})["cost"]
    assert cost["warmup_usd"] == pytest.approx(0.5 * 0.35) and cost["total_hours"] == pytest.approx(2.5)
    with pytest.raises(EstimateError, match="no warm-up"):
        estimate_job(_tiny(tmp_path), hours={**hours, "warmup": 0.5})
