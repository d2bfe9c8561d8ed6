"""Held-out evaluation: loss, perplexity, router load, and the merge diagnostics.

    loss = evaluate_loss(model, eval_NL, batch_size=16, num_batches=8, device=torch.device("cpu"))
    ppl = perplexity(loss)

The held-out batches are the first `num_batches x batch_size` sequences, always the same ones, so losses from
different stages and runs are comparable.

Legend: N = sequences, L = sequence length, T = routed tokens, E = experts.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def evaluate_loss(model, eval_NL: torch.Tensor, batch_size: int, num_batches: int, device: torch.device,
                  amp: torch.dtype | None = None) -> float:
    """Mean next-token loss over the fixed held-out batches (language-model loss only, no auxiliary loss)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, min(len(eval_NL), batch_size * num_batches), batch_size):
        batch_BL = eval_NL[start : start + batch_size].to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(input_ids=batch_BL, output_router_logits=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch_BL[:, 1:].flatten(), reduction="sum"
        )
        total, count = total + float(loss), count + batch_BL[:, 1:].numel()
    model.train(was_training)
    return total / max(1, count)


def perplexity(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))


def router_load(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Tokens routed to each expert, summed over MoE layers: float [E]. A collapsed router shows as one big entry."""
    counts = None
    for logits_TE in router_logits:
        if logits_TE is None:
            continue
        chosen = logits_TE.detach().float().topk(top_k, dim=-1).indices.flatten()
        layer = torch.bincount(chosen, minlength=logits_TE.shape[-1]).float().cpu()
        counts = layer if counts is None else counts + layer
    return counts if counts is not None else torch.zeros(0)
