"""Held-out evaluation: the chunked loss equals the full-logits loss, and its memory does not grow with the
vocabulary x batch (a 150k vocabulary, measured in a fresh process by benchmarks/eval_memory.py)."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from moedisco.training.heldout import evaluate_loss
from tests.conftest import REPO, tiny_hf_config

sys.path.insert(0, str(REPO / "benchmarks"))
from _common import run_child  # noqa: E402
from eval_memory import VOCAB, full_logits_loss  # noqa: E402


@pytest.mark.parametrize("logits_per_chunk", [97, 97 * 5, 2**24])  # one token, a few, the whole batch per chunk
def test_chunked_loss_equals_the_full_logits_loss(arch, logits_per_chunk):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(arch)).eval()
    eval_NL = torch.randint(0, 97, (6, 16))
    chunked = evaluate_loss(model, eval_NL, batch_size=6, num_batches=1, device=torch.device("cpu"),
                            logits_per_chunk=logits_per_chunk)
    with torch.no_grad():
        full = full_logits_loss(model, eval_NL) / eval_NL[:, 1:].numel()
    assert chunked == pytest.approx(full, rel=1e-5)


def test_eval_memory_on_a_150k_vocabulary_stays_under_two_batches_of_logits():
    measured = run_child(str(REPO / "benchmarks" / "eval_memory.py"),
                         {"mode": "chunked", "vocab": VOCAB, "batch": 8, "length": 64})
    print(measured)
    assert measured["peak_mb"] < 2 * measured["logits_mb"]
