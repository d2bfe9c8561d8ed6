"""Helpers shared by the benchmark scripts: a sized MoE config and peak-memory measurement in a subprocess."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def sized_config(hidden: int, num_experts: int = 4, layers: int = 4, vocab: int = 8192, arch: str = "qwen2_moe"):
    from moedisco.config import ModelConfig
    from moedisco.split import build_moe_config

    cfg = ModelConfig(arch=arch, num_experts=num_experts, num_experts_per_tok=2, hidden_size=hidden,
                      intermediate_size=4 * hidden, moe_intermediate_size=2 * hidden,
                      shared_expert_intermediate_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=1024)
    return build_moe_config(cfg, vocab, eos_id=0, pad_id=1)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def run_child(module_file: str, payload: dict) -> dict:
    """Run `python module_file --child JSON` in a fresh process (clean peak-RSS counter) and parse its JSON line."""
    out = subprocess.run([sys.executable, module_file, "--child", json.dumps(payload)], capture_output=True,
                         text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])
