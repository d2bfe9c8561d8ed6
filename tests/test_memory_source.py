"""The host memory of the `source` stage (`host_memory.host_plans`): the estimate against what the stage's own code
allocates, and the refusal of a job whose full MoE does not fit one node of its tier, before it starts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moedisco.config.loading import build_spec, load_spec
from moedisco.job.layout import JobPaths, mark_done
from moedisco.planning.host_memory import host_plans
from moedisco.planning.memory_plan import GB, MemoryFitError, resolve_memory
from moedisco.runner.job_runner import run_job
from tests.conftest import REPO, tiny_spec_dict

# A small MoE (19M parameters, 78 MB in fp32; 30M upcycled from a dense llama) built and saved as
# `split.stage_source` does, in a fresh process: the peak resident memory it adds (VmHWM, reset after the imports
# and a warm-up build) against its parameters' bytes.
MEASURE = """
import json, sys, tempfile
from pathlib import Path
from moedisco.config.loading import build_spec
from moedisco.models.weights import WEIGHTS_FILE, save_weights
from moedisco.stages.split import build_source_moe
from tests.conftest import tiny_spec_dict

def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
    return int(line.split()[1]) * 1024

spec = build_spec(json.loads(sys.argv[1]))
out = Path(tempfile.mkdtemp())
save_weights(build_source_moe(build_spec(tiny_spec_dict(out / "warm")), 512, 0, 1), out / "warm")  # lazy imports
Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
before = status("VmRSS:")
model = build_source_moe(spec, spec.tokenizer.vocab_size, 0, 1)
save_weights(model, out / "source")
print(json.dumps({"peak_delta": status("VmHWM:") - before,
                  "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                  "file_bytes": (out / "source" / WEIGHTS_FILE).stat().st_size}))
"""
SMALL = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 8}
SMALL_MOE = {**SMALL, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "num_experts": 8}


def _cpu_tier(node_memory_gb: float) -> dict:
    return {"cpu_tier": {"label": "cpu", "device_type": "cpu", "node_memory_gb": node_memory_gb}}


def _upcycled_model(tmp_path) -> dict:
    """A Mixtral upcycled from a small dense llama checkpoint (`model.pretrained`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=8192, **SMALL)).save_pretrained(
        tmp_path / "dense")
    return {"arch": "mixtral", "num_experts": 8, "num_experts_per_tok": 2, "pretrained": str(tmp_path / "dense")}


@pytest.mark.parametrize("upcycled", [False, True], ids=["fresh", "upcycled"])
def test_the_source_estimate_is_what_the_stage_allocates(tmp_path, upcycled):
    model = _upcycled_model(tmp_path) if upcycled else SMALL_MOE
    raw = tiny_spec_dict(tmp_path / "out", model=model, tokenizer={"vocab_size": 8192})
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(raw)], capture_output=True, text=True,
                         check=True, cwd=REPO)
    measured = json.loads(out.stdout.splitlines()[-1])
    plan = host_plans(build_spec(raw))["source"]
    assert plan["model_gb"] * GB == measured["parameter_bytes"]  # every parameter in fp32
    assert measured["file_bytes"] == pytest.approx(measured["parameter_bytes"], rel=0.01)  # + the header
    # Saving copies nothing; upcycling holds the dense model beside the MoE.
    assert bool(plan["upcycled_gb"]) == upcycled
    assert (plan["model_gb"] + plan["upcycled_gb"]) * GB == pytest.approx(measured["peak_delta"], rel=0.15)
    assert plan["total_gb"] == pytest.approx(plan["model_gb"] + plan["upcycled_gb"] + plan["process_gb"])


def _llama_moe(tmp_path, node_memory_gb: float):
    return load_spec(REPO / "examples" / "llama-moe-3.5b.yaml",
                     [f"output_dir={tmp_path / 'out'}", f"resources.cpu_tier.node_memory_gb={node_memory_gb}"])


def test_a_source_model_larger_than_a_cpu_node_is_refused_naming_what_to_change(tmp_path):
    with pytest.raises(MemoryFitError) as refused:
        resolve_memory(_llama_moe(tmp_path, 16))
    assert list(refused.value.problems) == ["source"]  # its training stages fit their devices
    message = str(refused.value)
    for part in ("source: needs 19.3 GB of host memory", "tier `cpu`", "4.58B parameters in fp32: 18.3 GB",
                 "a node has 16 GB", "set resources.cpu_tier.node_memory_gb"):
        assert part in message
    # 21 GB would hold it alone (95% usable: 19.95 GB), but the node hosts jobs' drivers too.
    with pytest.raises(MemoryFitError, match="2 GB of it left to the jobs' drivers it hosts"):
        resolve_memory(_llama_moe(tmp_path, 21))
    resolve_memory(_llama_moe(tmp_path, 64))  # a bigger node: it runs


def test_the_runner_refuses_before_any_stage_and_a_done_source_needs_nothing(tmp_path):
    spec = build_spec(tiny_spec_dict(tmp_path / "out", resources=_cpu_tier(0.5)))  # under the process alone
    with pytest.raises(MemoryFitError, match=r"source: needs 1.0 GB of host memory .* a node has 0.5 GB"):
        run_job(spec, progress=False)
    assert not (spec.output_dir / "stages").exists()
    mark_done(JobPaths(spec.output_dir), "source", {})  # a resumed job whose source model is built already
    resolve_memory(spec)


def test_the_tiny_spec_fits_and_the_estimate_shows_the_source_row(tmp_path):
    from typer.testing import CliRunner

    from moedisco_cli.main import app

    spec = build_spec(tiny_spec_dict(tmp_path / "out"))
    resolve_memory(spec)
    (tmp_path / "spec.yaml").write_text(spec.to_yaml())
    result = CliRunner().invoke(app, ["estimate", str(tmp_path / "spec.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    source = json.loads(result.output)["host"]["source"]
    assert source["fits"] and source["refused"] is None and source["node_memory_gb"] == 24  # the cpu default
    assert source["tier"] == "cpu" and 0 < source["model_gb"] < 0.01
