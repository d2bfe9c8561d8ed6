"""Held-out evaluation: loss, perplexity, router load, and the merge diagnostics.

    loss = evaluate_loss(model, eval_NL, batch_size=16, num_batches=8, device=torch.device("cpu"))
    ppl = perplexity(loss)

The held-out batches are the first `num_batches x batch_size` sequences, always the same ones, so losses from
different stages and runs are comparable.

Legend: N = sequences, B = batch, L = sequence length, H = hidden, V = vocabulary, T = tokens (routed
tokens in `router_load`), C = tokens of one chunk, E = experts.
"""

from __future__ import annotations

import math

import torch

from moedisco.models.routing import force_experts

LOGITS_PER_CHUNK = 2**24  # logits held at once: 64 MB in fp32, whatever the vocabulary or batch


@torch.no_grad()
def evaluate_loss(model, eval_NL: torch.Tensor, batch_size: int, num_batches: int, device: torch.device,
                  amp: torch.dtype | None = None, logits_per_chunk: int = LOGITS_PER_CHUNK) -> float:
    """Mean next-token loss over the fixed held-out batches (language-model loss only, no auxiliary loss)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, min(len(eval_NL), batch_size * num_batches), batch_size):
        batch_BL = eval_NL[start : start + batch_size].to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            total += batch_loss_sum(model, batch_BL, logits_per_chunk)
        count += batch_BL[:, 1:].numel()
    model.train(was_training)
    return total / max(1, count)


def batch_loss_sum(model, batch_BL: torch.Tensor, logits_per_chunk: int = LOGITS_PER_CHUNK) -> float:
    """Summed next-token loss of one batch, the vocabulary projection done a chunk of tokens at a time.

    The model's full logits (B x L x V: 10 GB in fp32 for 16 x 1024 tokens of a 150k vocabulary) and their
    log-softmax are never materialised: only the hidden states (B x L x H) are, and each chunk's logits are
    made, reduced to a loss and freed. On CUDA the chunk's logits are bf16 (the loss itself is summed in fp32).
    """
    hidden_BLH = model.get_decoder()(input_ids=batch_BL, output_router_logits=False).last_hidden_state
    return hidden_loss_sum(hidden_BLH, batch_BL, model.get_output_embeddings(), logits_per_chunk)


def hidden_loss_sum(hidden_BLH: torch.Tensor, batch_BL: torch.Tensor, head: torch.nn.Linear,
                    logits_per_chunk: int = LOGITS_PER_CHUNK) -> float:
    """`batch_loss_sum` from the decoder's final hidden states of the batch and the output head."""
    hidden_TH, targets_T = hidden_BLH[:, :-1].flatten(0, 1), batch_BL[:, 1:].flatten()
    tokens_per_chunk = max(1, logits_per_chunk // head.out_features)
    logits_dtype = torch.bfloat16 if hidden_TH.is_cuda else None
    total = 0.0
    for start in range(0, len(targets_T), tokens_per_chunk):
        with torch.autocast("cuda", dtype=logits_dtype, enabled=logits_dtype is not None):
            logits_CV = head(hidden_TH[start : start + tokens_per_chunk])
        total += float(torch.nn.functional.cross_entropy(
            logits_CV.float(), targets_T[start : start + tokens_per_chunk], reduction="sum"))
    return total


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


def oracle_loss(model, cluster_eval: list[torch.Tensor], batch_size: int, num_batches: int,
                device: torch.device, group: int = 1) -> float | None:
    """Held-out loss when each cluster's documents go to that cluster's expert (its group of `group` experts, routed
    among by their own rows): the bound a router could reach."""
    total, count = 0.0, 0
    for expert, eval_NL in enumerate(cluster_eval):
        if len(eval_NL) == 0:
            continue
        with force_experts(model, range(expert * group, (expert + 1) * group)):
            loss = evaluate_loss(model, eval_NL, batch_size, num_batches, device)
        used = min(len(eval_NL), batch_size * num_batches)
        total, count = total + loss * used, count + used
    return total / count if count else None
