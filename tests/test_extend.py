"""Growing and shrinking a finished MoE: `method: extend` adds experts for a new corpus, `method: retire` drops them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moedisco.config.architectures import REGISTRY
from moedisco.config.loading import SpecError, build_spec
from moedisco.io.token_shards import TokenShard
from moedisco.job.layout import JobPaths, stage_result
from moedisco.models.architecture import num_experts_of, parameter_roles, read_config
from moedisco.models.experts import expert_provenance
from moedisco.models.weights import SavedWeights
from moedisco.runner.job_runner import run_job
from tests.conftest import CORPUS, tiny_spec_dict

NEW_DOMAIN = "code"


def _split_corpus(folder):
    """The bundled corpus's code documents apart from the other three domains."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = CORPUS.read_text().splitlines()
    new = [line for line in lines if json.loads(line)["domain"] == NEW_DOMAIN]
    old = [line for line in lines if json.loads(line)["domain"] != NEW_DOMAIN]
    (folder / "old.jsonl").write_text("\n".join(old[:240]) + "\n")
    (folder / "new.jsonl").write_text("\n".join(new[:120]) + "\n")
    return folder / "old.jsonl", folder / "new.jsonl"


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """A finished 4-expert job on three domains, extended by one expert for the fourth, then that expert retired."""
    root = tmp_path_factory.mktemp("extend")
    old, new = _split_corpus(root / "data")
    base = build_spec(tiny_spec_dict(root / "base", data={"train": str(old)}, branch={"sync_rounds": 2}))
    run_job(base, progress=False)
    extension = build_spec({**tiny_spec_dict(root / "extended", data={"train": str(new)}), "name": "ext",
                            "method": "extend", "extend": {"base": str(root / "base")}})
    summary = run_job(extension, progress=False)
    retired = build_spec({"name": "ret", "output_dir": str(root / "retired"), "method": "retire",
                          "retire": {"base": str(root / "extended"), "experts": [4]}})
    run_job(retired, progress=False)
    return root, summary


def _tensors(folder):
    with SavedWeights(folder) as weights:
        return {name: weights.get(name) for name in weights.files}


def test_an_extension_adds_an_expert_and_leaves_the_old_ones_and_a_frozen_backbone_as_they_were(jobs):
    root, summary = jobs
    base, final = _tensors(root / "base" / "final"), _tensors(root / "extended" / "final")
    config = read_config(root / "extended" / "final")
    assert num_experts_of(config) == 5
    roles = parameter_roles(config)
    for name, tensor in final.items():
        if roles[name] == "shared":  # frozen while the new expert trained, and not trained by the router fine-tune
            assert torch.equal(tensor, base[name]), name
        elif roles[name] == "expert":
            assert torch.equal(tensor[:4], base[name]), name
            assert not torch.equal(tensor[4], base[name][0]) and tensor.shape[0] == 5
    routers = [name for name, role in roles.items() if role == "router"]
    assert routers and all(final[name].shape[0] == 5 for name in routers)
    assert any(not torch.equal(final[name][:4], base[name]) for name in routers)  # the router fine-tune moved it

    provenance = expert_provenance(config)
    assert [entry["job"] for entry in provenance] == ["test"] * 4 + ["ext"]
    assert provenance[4]["data"].endswith("new.jsonl") and provenance[4]["method"] == "extend"
    domains = stage_result(JobPaths(root / "extended"), "finetune")["domains"]
    assert {name.split("/")[0] for name in domains} == {"test", "ext"} and "ext/cluster 0" in domains
    assert summary["cost"]["total_usd"] > 0
    versus = summary["versus_rerun"]  # the base job's recipe again at 5 experts
    assert versus["rerun_experts"] == 5 and versus["rerun_job"] == str(root / "base")
    assert 0 < versus["flop_share"] < 1 and versus["rerun_ledger_usd"] > 0 and versus["ledger_share"] > 0


def test_retiring_the_new_expert_gives_back_the_base_experts_and_reports_each_domain(jobs):
    root, _ = jobs
    base, retired = _tensors(root / "base" / "final"), _tensors(root / "retired" / "final")
    roles = parameter_roles(read_config(root / "retired" / "final"))
    assert num_experts_of(read_config(root / "retired" / "final")) == 4
    for name, tensor in retired.items():
        if roles[name] != "router":  # the router rows are the extension's fine-tuned ones
            assert torch.equal(tensor, base[name]), name
    result = stage_result(JobPaths(root / "retired"), "retire")
    changes = {row["domain"]: row for row in result["domains"]}
    assert "ext/cluster 0" in changes and all(row["change"] is not None for row in changes.values())
    assert result["retired_provenance"][0]["job"] == "ext"
    assert [entry["job"] for entry in expert_provenance(read_config(root / "retired" / "final"))] == ["test"] * 4
    from moedisco.config.loading import load_saved_spec

    saved = load_saved_spec(root / "retired" / "spec.yaml").model  # the spec describes the model it delivers
    assert (saved.hidden_size, saved.num_experts, saved.arch) == (32, 4, "qwen2_moe")


def test_bad_extend_and_retire_specs_name_the_field(tmp_path, jobs):
    root, _ = jobs
    with pytest.raises(SpecError, match="needs the `extend` section"):
        build_spec({**tiny_spec_dict(tmp_path / "x"), "method": "extend"})
    with pytest.raises(SpecError, match="distinct indices"):
        build_spec({"output_dir": str(tmp_path / "y"), "method": "retire",
                    "retire": {"base": str(root / "base"), "experts": [1, 1]}})
    with pytest.raises(ValueError, match="experts 0-3, and at least two must stay"):
        run_job(build_spec({"output_dir": str(tmp_path / "z"), "method": "retire",
                            "retire": {"base": str(root / "base"), "experts": [4]}}), progress=False)
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "spec.yaml").write_text((root / "base" / "spec.yaml").read_text())  # nothing ran
    with pytest.raises(ValueError, match="no final/ model yet"):
        run_job(build_spec({**tiny_spec_dict(tmp_path / "w"), "method": "extend",
                            "extend": {"base": str(tmp_path / "unfinished")}}), progress=False)


def test_every_architecture_grows_and_shrinks_tensor_exactly(arch, tmp_path):
    """Per architecture: an extension's source (backbone + a copy of the favoured expert, a centroid router row)
    loads as a submodel, and dropping an expert keeps every other tensor bit for bit, and runs."""
    from transformers import AutoModelForCausalLM

    from moedisco.models.experts import rewrite_experts
    from moedisco.models.weights import save_weights
    from moedisco.stages.extend import new_expert_rows
    from moedisco.stages.split import load_submodel
    from tests.conftest import tiny_hf_config

    torch.manual_seed(0)
    save_weights(AutoModelForCausalLM.from_config(tiny_hf_config(arch)), tmp_path / "base")
    if not REGISTRY[arch].linear_router:  # every expert's score reads every other's: no expert comes or goes alone
        with pytest.raises(ValueError, match="router mixes experts"):
            rewrite_experts(tmp_path / "base", tmp_path / "retired", 3, lambda name, role, tensor: tensor[:3])
        return
    base = _tensors(tmp_path / "base")
    rows, copied = new_expert_rows(tmp_path / "base", [torch.randint(2, 97, (4, 16)), torch.randint(2, 97, (4, 16))])
    assert rows and all(value.shape[0] == 2 for value in rows.values()) and len(copied) == 2
    rewrite_experts(tmp_path / "base", tmp_path / "source", 2,
                    lambda name, role, tensor: rows[name] if name in rows else tensor[copied[0]])
    group = REGISTRY[arch].min_group  # DeepSeek's router routes two experts or more
    submodel = load_submodel(tmp_path / "source", 2 // group - 1, group)
    assert submodel(input_ids=torch.randint(2, 97, (1, 8))).logits.isfinite().all()

    keep = torch.tensor([0, 2, 3])
    rewrite_experts(tmp_path / "base", tmp_path / "retired", 3, lambda name, role, tensor: tensor[keep])
    roles = parameter_roles(read_config(tmp_path / "base"))
    for name, tensor in _tensors(tmp_path / "retired").items():
        assert torch.equal(tensor, base[name] if roles[name] == "shared" else base[name][keep]), name
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "retired"))
    assert num_experts_of(model.config) == 3 and model(input_ids=torch.randint(2, 97, (1, 8))).logits.isfinite().all()


@pytest.mark.parametrize("weighting", ["fisher", "samples"])
def test_a_merged_backbone_is_the_weighted_mean_of_the_base_and_the_new_submodel(jobs, tmp_path, weighting):
    """`extend.shared: merge` weighs as the job's merges do: documents, times each party's Fisher estimate with
    `fisher` (the base's: its submodels' second moments weighted by their clusters' documents)."""
    from safetensors.torch import load_file

    from moedisco.stages.cluster import ClusterResult

    root, _ = jobs
    spec = build_spec({**tiny_spec_dict(tmp_path / "merged_ext", data={"train": str(root / "data" / "new.jsonl")},
                                        finetune={"steps": 2}, merge={"weighting": weighting}),
                       "method": "extend", "extend": {"base": str(root / "base"), "shared": "merge",
                                                      "finetune": "all", "replay_fraction": 0.25}})
    run_job(spec, progress=False)
    paths, base_paths = JobPaths(tmp_path / "merged_ext"), JobPaths(root / "base")
    base, merged = _tensors(root / "base" / "final"), _tensors(paths.merged)
    submodel = load_file(paths.submodel(0) / "model.safetensors")
    sizes = ClusterResult.load(base_paths.clusters).sizes
    old, new = sum(sizes), sum(ClusterResult.load(paths.clusters).sizes)
    base_moments = [load_file(base_paths.submodel(k) / "second_moment.safetensors") for k in range(len(sizes))]
    new_moment = load_file(paths.submodel(0) / "second_moment.safetensors") if weighting == "fisher" else {}
    roles = parameter_roles(read_config(paths.merged))
    shared = [name for name in merged if roles[name] == "shared"]
    for name in shared:
        gamma_old, gamma_new = old / (old + new), new / (old + new)
        if weighting == "fisher" and name in new_moment:
            f_old = sum(moments[name].float() * size / old for moments, size in zip(base_moments, sizes)) + 1e-30
            f_new = new_moment[name].float() + 1e-30
            gamma_old, gamma_new = gamma_old * f_old / (gamma_old * f_old + gamma_new * f_new), \
                gamma_new * f_new / (gamma_old * f_old + gamma_new * f_new)
        expected = base[name].float() * gamma_old + submodel[name].float() * gamma_new
        torch.testing.assert_close(merged[name].float(), expected, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(merged[name], base[name]) for name in shared)  # the new submodel trained them
    final = _tensors(paths.final)
    assert any(not torch.equal(final[name], merged[name]) for name in shared)  # `finetune: all` trains them
    # Base and extension share the name "test": their domains are told apart by their place in the lineage.
    assert {"test#0/cluster 0", "test#1/cluster 0"} <= set(stage_result(paths, "finetune")["domains"])


def test_estimate_prices_an_extension_with_the_base_model_and_refuses_a_retirement(jobs):
    from moedisco.planning.estimate import EstimateError, estimate_job

    root, _ = jobs
    extension = build_spec({**tiny_spec_dict(root / "unused", data={"train": str(root / "data" / "new.jsonl")}),
                            "method": "extend", "extend": {"base": str(root / "base"), "new_experts": 2},
                            "model": {"hidden_size": 256}})  # the base's widths win
    estimate = estimate_job(extension)
    assert estimate["num_experts"] == 6 and estimate["cost"]["warmup_usd"] == 0
    assert estimate["cost"]["submodels_usd"] == pytest.approx(2 * estimate["cost"]["stages"]["submodel"]["usd"])
    assert estimate["parameters"]["total"] < 2_000_000  # hidden 32, not 256
    with pytest.raises(EstimateError, match="trains nothing"):
        estimate_job(build_spec({"output_dir": str(root / "unused"), "method": "retire",
                                 "retire": {"base": str(root / "base"), "experts": [0]}}))


def test_a_retired_experts_corpus_leaves_the_lineage_and_a_final_folder_names_its_job(jobs, tmp_path):
    """Extending a model with an expert retired (a data owner opted out) neither replays nor measures its corpus."""
    from moedisco.stages.domains import lineage, lineage_domains
    from moedisco.stages.extend import replay_source

    root, _ = jobs
    assert lineage(root / "base" / "final") == lineage(root / "base")
    assert [(a.folder, a.clusters) for a in lineage(root / "retired")] == [(root / "base", (0, 1, 2, 3)),
                                                                           (root / "extended", ())]
    run_job(build_spec({"name": "optout", "output_dir": str(tmp_path / "optout"), "method": "retire",
                        "retire": {"base": str(root / "base"), "experts": [1]}}), progress=False)
    assert [a.clusters for a in lineage(tmp_path / "optout")] == [(0, 2, 3)]
    assert "test/cluster 1" not in {d.name for d in lineage_domains(tmp_path / "optout")}
    spec = build_spec({**tiny_spec_dict(tmp_path / "again", data={"train": str(root / "data" / "new.jsonl")}),
                       "method": "extend", "extend": {"base": str(tmp_path / "optout")}})
    from moedisco.models.experts import with_checkpoint_model
    from moedisco.stages.cluster import ClusterResult

    clusters = ClusterResult.load(JobPaths(root / "base").clusters)
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "data").symlink_to(root / "extended" / "data")  # its new corpus, as prepared
    (tmp_path / "again" / "cluster").symlink_to(root / "extended" / "cluster")
    replay = replay_source(with_checkpoint_model(spec), JobPaths(tmp_path / "again"))
    assert len(replay.sources) == 2 and replay.shares[1] == pytest.approx(0.5)  # the new corpus, then the base's
    kept = np.flatnonzero(clusters.assignments != 1)
    copy = TokenShard.load(tmp_path / "again" / "replay" / "0")  # in this job's folder: the base's is only read
    assert copy.num_documents == len(kept) and replay.sources[1].shard.num_tokens == copy.num_tokens


def test_mixed_batches_give_each_source_its_share_and_repeat_on_resume():
    from moedisco.io.token_shards import MixedSource, TensorSource

    sources = [TensorSource(torch.arange(50).view(50, 1) + 1000 * i) for i in range(4)]
    mixed = MixedSource(sources, [0.5, 1 / 6, 1 / 6, 1 / 6])
    given = [sum(column) for column in zip(*(mixed.counts(step, 8) for step in range(30)))]
    assert given == [120, 40, 40, 40] and all(sum(mixed.counts(step, 8)) == 8 for step in range(30))
    assert torch.equal(mixed.batch(7, 8, seed=3), mixed.batch(7, 8, seed=3))
    rows = torch.cat([mixed.batch(step, 8, seed=3) for step in range(30)]).view(-1)
    assert len(set(rows[(rows >= 1000) & (rows < 2000)].tolist())) == 40  # each row of an epoch once
    with pytest.raises(ValueError, match="cannot mix"):
        MixedSource(sources, [0.25] * 4).counts(1, 2)


def test_an_extension_refuses_the_auto_recipe_and_domains_that_do_not_match_its_experts(tmp_path):
    base = {**tiny_spec_dict(tmp_path / "x"), "method": "extend", "extend": {"base": str(tmp_path)}}
    with pytest.raises(SpecError, match="recipe 'auto'"):
        build_spec({**base, "recipe": "auto"})
    with pytest.raises(SpecError, match="cluster.domains names 2 domains but extend.new_experts is 1"):
        build_spec({**base, "cluster": {"method": "field", "field": "domain", "domains": ["a", "b"]}})
