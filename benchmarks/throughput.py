"""Tokens per second of moedisco's training loop vs a minimal hand-written PyTorch loop (same model and batch).

    python benchmarks/throughput.py [--quick]

Target: moedisco >= 0.95 of the plain loop. Both loops run in this process, alternating, each on a fresh copy of
the same initial weights; evaluation and checkpoints are pushed past the measured steps so only the step loop is
compared (their cost is a separate, configurable choice).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from _common import sized_config
from transformers import AutoModelForCausalLM

from moedisco.config.spec import TrainConfig
from moedisco.io.token_shards import batch_for_step
from moedisco.job.metrics import MetricsWriter
from moedisco.training.loop import TrainContext, train

SEQ_LEN, BATCH = 128, 8


def plain_loop(model, seqs, steps: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    started = time.perf_counter()
    for step in range(steps):
        batch = batch_for_step(seqs, step, BATCH, seed=0)
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * BATCH * SEQ_LEN / (time.perf_counter() - started)


def moedisco_loop(model, seqs, steps: int) -> float:
    cfg = TrainConfig(steps=steps, batch_size=BATCH, lr=1e-4, eval_every=10**6, checkpoint_every=10**6)
    with tempfile.TemporaryDirectory() as tmp:
        context = TrainContext(Path(tmp) / "run", stage="submodel", seed=0,
                               metrics=MetricsWriter(Path(tmp) / "m.jsonl"), progress=False)
        result = train(model, seqs, None, cfg, context)
    return steps * BATCH * SEQ_LEN / result.seconds


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    steps, rounds = (20, 2) if args.quick else (50, 3)
    config = sized_config(256 if args.quick else 384)
    torch.manual_seed(0)
    initial = AutoModelForCausalLM.from_config(config)
    seqs = torch.randint(0, config.vocab_size, (256, SEQ_LEN))
    plain, ours = [], []
    for _ in range(rounds):
        plain.append(plain_loop(copy.deepcopy(initial), seqs, steps))
        ours.append(moedisco_loop(copy.deepcopy(initial), seqs, steps))
    result = {"benchmark": "throughput", "steps": steps, "rounds": rounds, "batch": BATCH, "seq_len": SEQ_LEN,
              "plain_tokens_per_s": max(plain), "moedisco_tokens_per_s": max(ours),
              "ratio": max(ours) / max(plain), "target": 0.95}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
