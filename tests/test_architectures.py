"""Every architecture in the registry through a whole MoE-DisCo job on the CPU, experts alone or in groups."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moedisco.config.architectures import REGISTRY, architecture
from moedisco.config.loading import build_spec
from moedisco.job.layout import JobPaths
from moedisco.job.metrics import read_metrics
from moedisco.models.architecture import expert_axes, num_experts_of, read_config
from moedisco.models.experts import expert_provenance
from moedisco.models.weights import SavedWeights
from moedisco.runner.job_runner import run_job
from tests.conftest import tiny_model_config, tiny_spec_dict

# (architecture, experts per submodel): each new architecture once, and the paper's ones in groups.
JOBS = [("deepseek_v3", 2), ("glm4_moe", 2), ("gpt_oss", 1), ("flex_olmo", 1), ("llama_moe", 1), ("qwen3_moe", 2)]


def _job(tmp_path, arch: str, group: int):
    model = {**tiny_model_config(arch).model_dump(mode="json"), "experts_per_submodel": group}
    spec = build_spec(tiny_spec_dict(tmp_path / arch, model=model, cluster={"method": "random"},
                                     submodel={"steps": 4, "checkpoint_every": 2}, finetune={"steps": 4}))
    run_job(spec, progress=False)
    return spec, JobPaths(tmp_path / arch)


@pytest.mark.parametrize(("arch", "group"), JOBS)
def test_a_job_splits_trains_merges_and_finetunes(tmp_path, arch, group):
    spec, paths = _job(tmp_path, arch, group)
    config = read_config(paths.merged)
    assert config.model_type == arch and num_experts_of(config) == 4 and spec.num_clusters == 4 // group
    # Submodel k's trained experts are the merged model's experts [k*g, (k+1)*g), in place; a group's router rows
    # train (one expert's get no gradient, only weight decay).
    with SavedWeights(paths.merged) as merged, SavedWeights(paths.source) as source:
        for k in range(spec.num_clusters):
            trained = load_file(paths.submodel(k) / "model.safetensors")
            for name, axes in expert_axes(config).items():
                if not axes or name not in trained:
                    continue
                if ".experts." in name:
                    assert torch.equal(merged.get(name).narrow(axes[0], k * group, group), trained[name]), name
                elif name.endswith("weight") and group > 1:
                    start = source.get(name).narrow(axes[0], k * group, group)
                    assert not torch.allclose(trained[name], start, rtol=0.05), name
    assert [entry["cluster"] for entry in expert_provenance(config)] == [e // group for e in range(4)]
    final = AutoModelForCausalLM.from_pretrained(str(paths.root / "final")).eval()
    ids = torch.randint(2, 97, (2, 16))
    assert final(input_ids=ids, labels=ids).loss.isfinite()
    biases = [bias for name, bias in final.named_buffers() if name.endswith("e_score_correction_bias")]
    assert not biases or any(torch.count_nonzero(bias) for bias in biases)  # balanced with no auxiliary loss
    loads = [record["router_load"] for record in read_metrics(paths.metrics, "finetune") if "router_load" in record]
    assert loads and all(len(load) == 4 and sum(load) == pytest.approx(1.0) for load in loads)


def test_an_unknown_architecture_names_what_to_add():
    with pytest.raises(ValueError, match="add an ArchitectureEntry to moedisco.config.architectures.REGISTRY"):
        architecture("jamba")


@pytest.mark.parametrize("arch", [arch for arch, entry in REGISTRY.items() if entry.min_group > 1])
def test_group_limited_routers_need_groups_of_two(tmp_path, arch):
    model = tiny_model_config(arch).model_dump(mode="json")
    with pytest.raises(ValueError, match="experts_per_submodel must be at least 2"):
        build_spec(tiny_spec_dict(tmp_path, model=model))
    with pytest.raises(ValueError, match="must divide num_experts"):
        build_spec(tiny_spec_dict(tmp_path, model={**model, "experts_per_submodel": 3}))


def test_a_biased_router_is_balanced_without_an_auxiliary_loss(tmp_path):
    """DeepSeek-style routers: the expert bias moves by the rate against each expert's load after every step, and
    only in training; routers without a bias are left alone."""
    from moedisco.training.balance import BiasBalancer
    from tests.conftest import tiny_hf_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_hf_config("deepseek_v3"))
    router = model.model.layers[0].mlp.gate
    with torch.no_grad():
        router.weight[0] += 5 * router.weight[0].abs().max()  # expert 0 favoured
    balancer = BiasBalancer(model, rate=0.01)
    ids = torch.randint(2, 97, (4, 16))
    model.eval()
    model(input_ids=ids)
    balancer.step()
    assert torch.count_nonzero(router.e_score_correction_bias) == 0  # evaluation moves nothing
    model.train()
    model(input_ids=ids)
    load = balancer.counts[0].clone()
    balancer.step()
    expected = 0.01 * torch.sign(load.mean() - load).float()
    torch.testing.assert_close(router.e_score_correction_bias, expected)
    assert router.e_score_correction_bias[int(load.argmax())] < 0
    balancer.close()
    assert not BiasBalancer(AutoModelForCausalLM.from_config(tiny_hf_config("qwen2_moe")), 0.01).routers


def test_the_estimate_sizes_a_group_submodel(tmp_path):
    """A submodel of g experts holds g experts' parameters and activates min(k, g) of them per token: its memory
    plan and its FLOPs are those, not one expert's."""
    from moedisco.planning.estimate import estimate_job

    raw = tiny_spec_dict(tmp_path, model={**tiny_model_config("qwen3_moe").model_dump(mode="json"),
                                          "num_experts": 8, "num_experts_per_tok": 2})
    single = estimate_job(build_spec(raw))
    grouped = estimate_job(build_spec({**raw, "model": {**raw["model"], "experts_per_submodel": 4}}))
    counts = grouped["parameters"]
    assert counts["submodel"] == counts["shared"] + 4 * counts["per_expert"]
    assert counts["submodel_active"] == counts["shared"] + 2 * counts["per_expert"]
    assert grouped["memory"]["submodel"]["total_gb"] > single["memory"]["submodel"]["total_gb"]
    # Equal steps: two submodels of four experts, each token through two of them, against eight of one.
    per_step = lambda result: result["cost"]["stages"]["submodel"]["params"]  # noqa: E731
    assert per_step(grouped) == counts["submodel_active"] and per_step(single) == counts["dense"]
    assert grouped["cost"]["submodels_usd"] == pytest.approx(
        single["cost"]["submodels_usd"] * 2 * counts["submodel_active"] / (8 * counts["dense"]), rel=1e-6)


def test_a_pretrained_checkpoint_names_its_architecture(tmp_path):
    """`model.arch` left out is learnt from the checkpoint, and the architecture's rules apply to it; a spec that
    names another architecture is refused."""
    from moedisco.models.experts import with_checkpoint_model
    from moedisco.models.weights import save_weights
    from tests.conftest import tiny_hf_config

    save_weights(AutoModelForCausalLM.from_config(tiny_hf_config("deepseek_v3")), tmp_path / "ds")
    model = {"pretrained": str(tmp_path / "ds"), "num_experts": 4, "experts_per_submodel": 2}
    spec = with_checkpoint_model(build_spec(tiny_spec_dict(tmp_path / "a", model=model)))
    assert spec.model.arch == "deepseek_v3"
    with pytest.raises(ValueError, match="at least 2 for deepseek_v3"):
        with_checkpoint_model(build_spec(tiny_spec_dict(tmp_path / "b", model={**model, "experts_per_submodel": 1})))
    with pytest.raises(ValueError, match="model.arch is 'mixtral' but model.pretrained"):
        with_checkpoint_model(build_spec(tiny_spec_dict(tmp_path / "c", model={**model, "arch": "mixtral"})))


def test_the_auto_recipe_gives_groups_the_cheap_phase_of_single_experts(tmp_path):
    raw = tiny_spec_dict(tmp_path, recipe="auto", full_parameter={"steps": 1000, "batch_size": 64},
                         model={**tiny_model_config("qwen3_moe").model_dump(mode="json"), "num_experts": 16})
    sequences = lambda spec: spec.num_clusters * spec.submodel.steps * spec.submodel.batch_size  # noqa: E731
    single = build_spec(raw)
    grouped = build_spec({**raw, "model": {**raw["model"], "experts_per_submodel": 4}})
    assert grouped.num_clusters == 4 and sequences(grouped) == pytest.approx(sequences(single), rel=0.05)


@pytest.mark.parametrize(("groups", "picked", "expected"), [(2, 1, (1, 1)), (4, 1, (2, 1)), (4, 2, (2, 2))])
def test_a_submodel_keeps_the_size_of_deepseek_expert_groups_and_routes_as_forced(tmp_path, groups, picked,
                                                                                  expected):
    """8 experts in routing groups of 8 / `groups`, tokens routed within `picked` groups: a submodel of 4 experts
    keeps the groups' size, and forcing the full model onto those experts gives the submodel's output."""
    from moedisco.models.architecture import with_num_experts
    from moedisco.models.routing import force_experts
    from moedisco.models.weights import save_weights
    from moedisco.stages.split import load_submodel
    from tests.conftest import tiny_hf_config

    config = tiny_hf_config("deepseek_v3", num_experts=8)
    config.n_group, config.topk_group, config.num_experts_per_tok = groups, picked, 2
    sub_config = with_num_experts(config, 4)
    assert (sub_config.n_group, sub_config.topk_group) == expected
    torch.manual_seed(0)
    source = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in source.model.layers:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.1)  # a trained model's bias
    save_weights(source, tmp_path / "source")
    ids = torch.randint(2, 97, (2, 16))
    sub = load_submodel(tmp_path / "source", 1, 4).eval()
    with force_experts(source, range(4, 8)):
        expected = source(input_ids=ids).logits
    torch.testing.assert_close(sub(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_the_balanced_bias_stays_in_fp32_in_a_bf16_model_across_a_resume(tmp_path):
    """bf16-true casts every weight; the expert bias stays fp32 (in bf16, 0.375 + 0.001 rounds back to 0.375), also
    when a run resumes from its checkpoint: after 4 steps every entry is a whole number of 1e-3 steps."""
    from moedisco.config.spec import TrainConfig
    from moedisco.job.metrics import MetricsWriter
    from moedisco.training.loop import TrainContext, train
    from tests.conftest import tiny_hf_config

    torch.manual_seed(0)
    seqs = torch.randint(2, 97, (16, 16))
    cfg = TrainConfig(steps=4, batch_size=4, precision="bf16-true", device="cpu", eval_every=4, checkpoint_every=2,
                      router_bias_rate=1e-3)
    for stop_at in (2, None):  # a round's end, then the resumed run to the end
        model = AutoModelForCausalLM.from_config(tiny_hf_config("deepseek_v3"))
        with torch.no_grad():  # 0.375 is exact in bf16, whose spacing there (0.002) swallows a step of 0.001
            model.model.layers[1].mlp.gate.e_score_correction_bias.fill_(0.375)
        train(model, seqs, None, cfg, TrainContext(tmp_path / "run", stage="finetune", seed=0, stop_at=stop_at,
                                                   metrics=MetricsWriter(tmp_path / "m.jsonl"), progress=False))
    biases = [layer.mlp.gate.e_score_correction_bias for layer in model.model.layers]
    assert all(bias.dtype == torch.float32 for bias in biases)
    steps = torch.cat([biases[0], biases[1] - 0.375]) / 1e-3
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-3)
    assert steps.abs().max() > 0


def test_a_job_saved_before_the_arch_was_learnt_resumes(tmp_path):
    """A job on a pretrained checkpoint saved its spec with the default `model.arch` (qwen2_moe) before the arch was
    learnt from the checkpoint: resuming it compares like with like and goes on."""
    from moedisco.job.layout import JobPaths
    from moedisco.models.experts import with_checkpoint_model
    from moedisco.models.weights import save_weights
    from moedisco.runner.job_runner import check_same_job
    from tests.conftest import tiny_hf_config

    save_weights(AutoModelForCausalLM.from_config(tiny_hf_config("mixtral")), tmp_path / "mixtral")
    spec = build_spec(tiny_spec_dict(tmp_path / "job", model={"pretrained": str(tmp_path / "mixtral"),
                                                              "num_experts": 4}))
    assert spec.model.arch == "qwen2_moe"
    paths = JobPaths(tmp_path / "job")
    paths.root.mkdir(parents=True)
    spec.save(paths.spec)  # as the earlier version saved it
    resumed = with_checkpoint_model(spec)
    assert resumed.model.arch == "mixtral"
    check_same_job(resumed, paths)
    with pytest.raises(ValueError, match="different model.arch"):
        check_same_job(resumed.model_copy(update={"model": resumed.model.model_copy(update={"arch": "olmoe"})}),
                       paths)


def test_the_router_load_of_a_biased_router_counts_what_it_picked(tmp_path):
    """The logged router load of a DeepSeek-style router is the routing its bias made, not its logits' top-k."""
    from moedisco.config.spec import TrainConfig
    from moedisco.job.metrics import MetricsWriter
    from moedisco.training.loop import TrainContext, train
    from tests.conftest import tiny_hf_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_hf_config("deepseek_v3"))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.tensor([5.0, 5.0, 0.0, 0.0]))  # always experts 0, 1
    cfg = TrainConfig(steps=1, batch_size=4, device="cpu", eval_every=1, checkpoint_every=1, router_bias_rate=1e-3)
    train(model, torch.randint(2, 97, (8, 16)), None, cfg, TrainContext(
        tmp_path / "run", stage="finetune", seed=0, metrics=MetricsWriter(tmp_path / "m.jsonl"), progress=False))
    load = [r["router_load"] for r in read_metrics(tmp_path / "m.jsonl") if "router_load" in r][-1]
    assert load == pytest.approx([0.5, 0.5, 0.0, 0.0])
