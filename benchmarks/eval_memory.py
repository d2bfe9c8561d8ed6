"""Peak memory of one held-out evaluation on a large vocabulary, against one batch of fp32 logits.

    python benchmarks/eval_memory.py [--quick]        # prints JSON: chunked (moedisco) and full logits

Each measurement runs in its own process: a tiny qwen2_moe (hidden 32) with a 150k vocabulary, so the logits are
nearly all the memory, evaluated once to warm up; then the peak-RSS mark is reset and one `evaluate_loss` over a
batch is measured. `full` is what evaluation did before it was chunked (the model's whole logits, a contiguous
copy of the shifted logits, their log-softmax). Target (tests/test_evaluate.py): chunked under 2 x one batch of
logits, whatever the vocabulary.
"""

from __future__ import annotations

import json

from _common import bench_args, peak_rss_mb, reset_peak_rss, run_child

VOCAB, BATCH, LENGTH = 150_000, 8, 64


def full_logits_loss(model, batch_BL) -> float:
    """The evaluation before chunking, for the comparison."""
    import torch

    logits_BLV = model(input_ids=batch_BL, output_router_logits=False).logits
    return float(torch.nn.functional.cross_entropy(logits_BLV[:, :-1].flatten(0, 1).float(),
                                                   batch_BL[:, 1:].flatten(), reduction="sum"))


def child(payload: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from moedisco.config.spec import ModelConfig
    from moedisco.models.architecture import build_moe_config
    from moedisco.training.heldout import evaluate_loss

    torch.set_num_threads(2)
    torch.manual_seed(0)  # the same model and batch in every process, so the modes' losses agree
    config = ModelConfig(num_experts=2, num_experts_per_tok=1, hidden_size=32, intermediate_size=64,
                         moe_intermediate_size=32, shared_expert_intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = AutoModelForCausalLM.from_config(build_moe_config(config, payload["vocab"], eos_id=0, pad_id=1)).eval()
    batch, length = payload["batch"], payload["length"]
    eval_NL = torch.randint(0, payload["vocab"], (batch, length))
    cpu = torch.device("cpu")

    def measured():
        if payload["mode"] == "full":
            with torch.no_grad():
                return full_logits_loss(model, eval_NL)
        return evaluate_loss(model, eval_NL, batch_size=batch, num_batches=1, device=cpu) * (batch * (length - 1))

    evaluate_loss(model, eval_NL[:1, :8], batch_size=1, num_batches=1, device=cpu)  # kernels, thread pools
    before = reset_peak_rss()
    loss_sum = measured()
    logits_mb = batch * (length - 1) * payload["vocab"] * 4 / 2**20
    return {**payload, "peak_mb": round(peak_rss_mb() - before, 1), "logits_mb": round(logits_mb, 1),
            "loss_sum": loss_sum}


def main(argv=None) -> None:
    args = bench_args(__doc__, child, argv)
    if args is None:
        return
    sizes = [(VOCAB, BATCH, LENGTH)] if args.quick else [(VOCAB, BATCH, LENGTH), (VOCAB, 16, 128)]
    results = [run_child(__file__, {"mode": mode, "vocab": vocab, "batch": batch, "length": length})
               for vocab, batch, length in sizes for mode in ("chunked", "full")]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
