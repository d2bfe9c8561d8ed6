"""Retiring experts of a finished MoE (`method: retire`): their tensors and router rows dropped, nothing trained.

    summary = stage_retire(run)     # final/: the base model less `retire.experts`; the loss change on each domain

Top-k routing then chooses among the experts that stay, so a token that went to a retired expert goes to its next
choice. A model extended with new experts (`method: extend`) and a frozen backbone gets the base model's routing back
when those experts are retired, bar the router rows its fine-tune moved. The change in held-out loss is reported for
every domain of the base's lineage (`moedisco.stages.domains`), the retired experts' own included.
"""

from __future__ import annotations

import time

import torch

from moedisco.job.provenance import loss_changes
from moedisco.models.architecture import num_experts_of, read_config
from moedisco.models.experts import base_model, expert_provenance, rewrite_experts
from moedisco.stages import prepare
from moedisco.stages.domains import domain_losses, lineage_domains
from moedisco.stages.stage_run import StageRun


def stage_retire(run: StageRun) -> dict:
    spec, paths = run.spec, run.paths
    started = time.perf_counter()
    base = base_model(spec.retire.base)
    config = read_config(base)
    keep = [k for k in range(num_experts_of(config)) if k not in spec.retire.experts]
    index = torch.tensor(keep)
    provenance = [entry for entry in expert_provenance(config) if entry["expert"] in keep]
    rewrite_experts(base, paths.final, len(keep), lambda name, role, tensor: tensor[index], provenance=provenance)
    prepare.load_tokenizer(base).save_pretrained(paths.final)
    domains = lineage_domains(spec.retire.base)
    changes = loss_changes(domain_losses(base, domains), domain_losses(paths.final, domains))
    seconds = time.perf_counter() - started
    run.metrics.write({"stage": "retire", "step": 0, "seconds": seconds, "device": "cpu"})
    return {"base": str(base), "retired": spec.retire.experts, "experts": len(keep), "domains": changes,
            "retired_provenance": [entry for entry in expert_provenance(config) if entry["expert"] not in keep],
            "seconds": seconds}
