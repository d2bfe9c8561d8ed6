"""Branching the MoE from the shared warm-up: the one-expert model becomes every expert (sparse upcycling).

    upcycle_submodel(OUTPUT / "source", OUTPUT / "runs/warmup/model.safetensors", OUTPUT / "branched")

The warm-up's shared parameters carry over and its one expert is copied into every expert; the router keeps the
source's initialisation. Upcycling a dense Hugging Face checkpoint (`model.pretrained`) is `moedisco.dense_to_moe`.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from moedisco.split import WEIGHTS_FILE, num_experts_of, parameter_roles, read_config


def upcycle_submodel(source: Path, dense_weights: Path, out: Path) -> Path:
    """A full MoE whose shared parameters and every expert come from a trained one-expert model.

    Router rows keep the source's initialisation: the one-expert model's single row carries no routing information.
    """
    config = read_config(source)
    num_experts = num_experts_of(config)
    state = {}
    with safe_open(dense_weights, framework="pt") as dense, safe_open(source / WEIGHTS_FILE, framework="pt") as src:
        stored = set(src.keys())
        for name, role in parameter_roles(config).items():
            if name not in stored:
                continue  # tied lm_head
            if role == "router":
                state[name] = src.get_tensor(name)
            else:
                tensor = dense.get_tensor(name)
                state[name] = tensor.expand(num_experts, *tensor.shape[1:]).clone() if role == "expert" else tensor
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file(state, out / WEIGHTS_FILE, metadata={"format": "pt"})
    return out
