"""Model decoupling and reintegration: the properties the paper's algorithm relies on, for every architecture."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from moedisco.config.architectures import REGISTRY
from moedisco.models import layerwise
from moedisco.models.architecture import parameter_roles
from moedisco.models.routing import force_experts
from moedisco.models.weights import WEIGHTS_FILE, save_weights, unique_state_dict
from moedisco.stages.merge import averaging_weights, merge_submodels, merged_losses
from moedisco.stages.router_rows import centroid_router_rows, init_router_from_centroids, patch_tensors
from moedisco.stages.split import load_submodel
from moedisco.training.heldout import evaluate_loss, oracle_loss
from tests.conftest import tiny_hf_config


def _source(arch, tmp_path, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(arch)).eval()
    save_weights(model, tmp_path / "source")
    return model


def _save_submodels(tmp_path, num_experts, transform=None, group=1):
    files = []
    for k in range(num_experts // group):
        sub = load_submodel(tmp_path / "source", k, group)
        if transform is not None:
            transform(k, sub)
        path = tmp_path / f"sub{k}.safetensors"
        save_file(unique_state_dict(sub), path)
        files.append(path)
    return files


def test_roles_cover_experts_router_and_shared(arch):
    roles = parameter_roles(tiny_hf_config(arch))
    assert {"shared", "expert", "router"} == set(roles.values())
    assert all(".experts." in name for name, role in roles.items() if role == "expert")
    router = f".{REGISTRY[arch].router}."
    assert all(router in name for name, role in roles.items() if role == "router")
    assert roles["model.embed_tokens.weight"] == "shared" and roles["lm_head.weight"] == "shared"


@pytest.mark.parametrize("largest", [False, True])
def test_split_then_merge_restores_source_bit_for_bit(arch, largest, tmp_path):
    """One expert per submodel (or the architecture's smallest group), and groups of half the experts."""
    source = _source(arch, tmp_path)
    files = _save_submodels(tmp_path, 4, group=2 if largest else REGISTRY[arch].min_group)
    merge_submodels(tmp_path / "source", files, averaging_weights([5] * len(files), "uniform"), "concat",
                    tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / WEIGHTS_FILE)
    for name, tensor in source.state_dict().items():
        assert torch.equal(merged[name], tensor), name
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), source.state_dict().values()))


def test_shared_parameters_are_the_sample_weighted_mean(tmp_path):
    _source("qwen2_moe", tmp_path)
    sizes = [10, 30, 20, 40]

    def perturb(k, sub):  # each submodel's shared tensors move by a different known amount
        with torch.no_grad():
            sub.model.embed_tokens.weight.add_(float(k + 1))

    files = _save_submodels(tmp_path, 4, perturb)
    weights = averaging_weights(sizes, "samples")
    assert weights == [0.1, 0.3, 0.2, 0.4]
    merge_submodels(tmp_path / "source", files, weights, "concat", tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / WEIGHTS_FILE)["model.embed_tokens.weight"]
    copies = [load_file(f)["model.embed_tokens.weight"] for f in files]
    expected = sum(w * c for w, c in zip(weights, copies))
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)


def test_submodel_forward_equals_source_routed_among_its_experts(arch, tmp_path):
    source = _source(arch, tmp_path)
    input_ids = torch.randint(0, 97, (2, 16))
    for group in sorted({REGISTRY[arch].min_group, 2}):
        for index in (0, 4 // group - 1):
            sub = load_submodel(tmp_path / "source", index, group).eval()
            with force_experts(source, range(index * group, (index + 1) * group)):
                expected = source(input_ids=input_ids).logits
            torch.testing.assert_close(sub(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-5)


@contextmanager
def _every_token_to(model, arch, expert):
    """Independently of `force_experts`: each router's output replaced by one sending every token to `expert` with
    weight 1 (the softmax of a +-1e4 row)."""

    def hook(module, args, output):
        forced_TE = torch.full_like(output[0], -1e4)
        forced_TE[:, expert] = 1e4
        weights, indices = torch.softmax(forced_TE.float(), dim=-1).topk(module.top_k, dim=-1)
        return forced_TE, weights.to(output[0].dtype), indices

    suffix = REGISTRY[arch].router
    handles = [m.register_forward_hook(hook) for name, m in model.named_modules() if name.endswith(suffix)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("arch", [arch for arch, entry in REGISTRY.items() if entry.min_group == 1])
def test_a_one_expert_submodel_is_the_source_with_every_token_sent_to_its_expert(arch, tmp_path):
    source = _source(arch, tmp_path)
    input_ids = torch.randint(0, 97, (2, 16))
    for expert in (0, 3):
        with _every_token_to(source, arch, expert):
            expected = source(input_ids=input_ids).logits
        sub = load_submodel(tmp_path / "source", expert).eval()
        torch.testing.assert_close(sub(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_group_that_does_not_divide_the_experts_is_refused(tmp_path):
    _source("qwen3_moe", tmp_path)
    with pytest.raises(ValueError, match="do not divide"):
        load_submodel(tmp_path / "source", 0, 3)
    with pytest.raises(ValueError, match="out of range"):
        load_submodel(tmp_path / "source", 2, 2)


def test_submodel_is_smaller_and_router_gets_no_gradient(tmp_path):
    source = _source("qwen2_moe", tmp_path)
    sub = load_submodel(tmp_path / "source", 1)
    assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in source.parameters())
    ids = torch.randint(0, 97, (2, 8))
    sub(input_ids=ids, labels=ids).loss.backward()
    gate = sub.model.layers[0].mlp.gate.weight
    assert gate.grad is None or torch.count_nonzero(gate.grad) == 0
    assert torch.count_nonzero(sub.model.layers[0].mlp.experts.gate_up_proj.grad) > 0


def test_random_router_init_differs_from_concat(tmp_path):
    source = _source("mixtral", tmp_path)
    files = _save_submodels(tmp_path, 4)
    merge_submodels(tmp_path / "source", files, [0.25] * 4, "random", tmp_path / "merged", seed=1)
    merged = load_file(tmp_path / "merged" / WEIGHTS_FILE)
    gate = "model.layers.0.mlp.gate.weight"
    assert merged[gate].shape == source.state_dict()[gate].shape
    assert not torch.equal(merged[gate], source.state_dict()[gate])
    assert torch.equal(merged["model.layers.0.mlp.experts.down_proj"], source.state_dict()["model.layers.0.mlp.experts.down_proj"])


def test_sharded_merge_loads(tmp_path):
    source = _source("olmoe", tmp_path)
    files = _save_submodels(tmp_path, 4)
    merge_submodels(tmp_path / "source", files, [0.25] * 4, "concat", tmp_path / "merged", max_file_bytes=20_000)
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), source.state_dict().values()))


def test_fisher_merge_weighs_each_element_by_its_sensitivity(tmp_path):
    _source("mixtral", tmp_path)
    files = _save_submodels(tmp_path, 2, lambda k, sub: sub.model.norm.weight.data.fill_(float(k + 1)))
    norm = "model.norm.weight"
    hidden = load_file(files[0])[norm].numel()
    fisher = []
    for k, f in enumerate(files):
        moments = {name: torch.ones_like(t) for name, t in load_file(f).items()}
        sensitive = torch.zeros(hidden)
        sensitive[: hidden // 2] = 3.0 if k == 0 else 1.0  # first half: submodel 0 three times as sensitive
        moments[norm] = sensitive  # second half: nobody sensitive -> the plain sample-weighted mean
        save_file(moments, tmp_path / f"fisher{k}.safetensors")
        fisher.append(tmp_path / f"fisher{k}.safetensors")
    merge_submodels(tmp_path / "source", files, [0.5, 0.5], "concat", tmp_path / "merged", fisher=fisher)
    merged = load_file(tmp_path / "merged" / WEIGHTS_FILE)[norm]
    torch.testing.assert_close(merged[: hidden // 2], torch.full((hidden // 2,), 0.75 * 1 + 0.25 * 2))
    torch.testing.assert_close(merged[hidden // 2 :], torch.full((hidden - hidden // 2,), 1.5))


def test_fisher_merge_falls_back_to_weights_for_tensors_without_moments(tmp_path):
    _source("qwen2_moe", tmp_path)
    files = _save_submodels(tmp_path, 2, lambda k, sub: sub.model.norm.weight.data.fill_(float(k + 1)))
    fisher = []
    for k, f in enumerate(files):  # the norm was frozen: no optimizer state, no second moment
        moments = {name: torch.ones_like(t) for name, t in load_file(f).items() if name != "model.norm.weight"}
        save_file(moments, tmp_path / f"fisher{k}.safetensors")
        fisher.append(tmp_path / f"fisher{k}.safetensors")
    merge_submodels(tmp_path / "source", files, [0.25, 0.75], "concat", tmp_path / "merged", fisher=fisher)
    merged = load_file(tmp_path / "merged" / WEIGHTS_FILE)["model.norm.weight"]
    torch.testing.assert_close(merged, torch.full_like(merged, 0.25 * 1 + 0.75 * 2))


def test_streamed_centroid_rows_equal_the_full_moe_ones_and_patch_only_the_routers(arch, tmp_path, monkeypatch):
    monkeypatch.setattr(layerwise, "PASS_TOKENS", 24)  # batches of 8 sequences of 12 tokens go through in 4 passes
    source = _source(arch, tmp_path)
    group = REGISTRY[arch].min_group
    files = _save_submodels(tmp_path, 4, group=group)
    merge_submodels(tmp_path / "source", files, [group / 4] * (4 // group), "concat", tmp_path / "merged",
                    max_file_bytes=20_000)
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    generator = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 97, (n, 12), generator=generator) for n in (3, 9, 1, 5)]  # uneven last batches
    if not REGISTRY[arch].linear_router:  # LLaMA-MoE's two-layer gate network has no rows to set
        with pytest.raises(ValueError, match="router is not one"):
            centroid_router_rows(tmp_path / "merged", seqs, batch_size=8)
        return
    init_router_from_centroids(source, seqs)
    rows = centroid_router_rows(tmp_path / "merged", seqs, batch_size=8)
    assert set(rows) == {name for name, role in parameter_roles(source.config).items()
                         if role == "router" and name.endswith(".weight")}  # a router's bias keeps its value
    patch_tensors(tmp_path / "merged", rows)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    for name, tensor in source.state_dict().items():
        if name in rows:
            torch.testing.assert_close(after[name], tensor, rtol=0, atol=1e-6)
        else:
            assert torch.equal(after[name], before[name]), name
    # The merge's evaluation, streamed the same way, gives the loaded model's losses.
    held_out, cluster_eval = seqs[1], [seqs[0], seqs[3][:0], seqs[3], seqs[2]][: 4 // group]
    eval_loss, oracle = merged_losses(tmp_path / "merged", held_out, cluster_eval, batch_size=2, num_batches=3,
                                      group=group)
    cpu = torch.device("cpu")
    assert eval_loss == pytest.approx(evaluate_loss(source, held_out, 2, 3, cpu), rel=1e-5)
    assert oracle == pytest.approx(oracle_loss(source, cluster_eval, 2, 3, cpu, group), rel=1e-5)
