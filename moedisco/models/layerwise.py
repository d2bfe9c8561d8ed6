"""A saved Hugging Face decoder run one layer at a time: only one decoder layer's weights are ever in memory.

    with SavedWeights(OUTPUT / "merged") as weights:
        for index, layer_out in stream_layers(weights, [cluster0_NL, cluster1_NL], batch_size=8,
                                              on_layer=lambda index, layer: ...):
            ...

The model's own forward does the work (its rotary embeddings, its causal mask, the decoder layer built for that
index): the model is built on the meta device, its `layers` list holds one layer at a time, loaded from the saved
files, while every group of sequences goes through it. The hidden states (N x L x H) wait between layers in a
memory-mapped scratch file, so the peak is one layer, the embedding and one pass's activations.

Legend: N = sequences, L = sequence length, H = hidden.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from moedisco.models.weights import SavedWeights, fp32

PASS_TOKENS = 1024  # tokens run through a layer at once: bounds the activations (an expert's are tokens x 2I)


def _stem(weights: SavedWeights) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    """The decoder with its rotary embedding and final norm real, its embedding and layers on the meta device (it
    is fed `inputs_embeds`), and its list of layers."""
    with torch.device("meta"):
        decoder = AutoModelForCausalLM.from_config(weights.config).get_decoder()
    layers = decoder.layers
    decoder.rotary_emb = type(decoder.rotary_emb)(config=decoder.config)  # its buffers are computed, not stored
    decoder.norm.load_state_dict(weights.under("model.norm."), assign=True)
    # The decoder's forward walks `config.num_hidden_layers` layers and picks each one's mask by its index.
    decoder.config = copy.copy(decoder.config)
    decoder.config.num_hidden_layers = 1
    return decoder, layers


def _load_layer(weights: SavedWeights, layers: torch.nn.ModuleList, index: int) -> torch.nn.Module:
    layer = layers[index]
    layer.load_state_dict(weights.under(f"model.layers.{index}."), strict=True, assign=True)
    return layer


@torch.no_grad()
def stream_layers(weights: SavedWeights, groups_NL: Sequence[torch.Tensor], batch_size: int,
                  on_layer: Callable[[int, torch.nn.Module], Callable[[int], AbstractContextManager]] | None = None,
                  ) -> list[torch.Tensor]:
    """Run every group of token sequences through the saved model, one decoder layer at a time; returns each
    group's final hidden states (after the final norm, N x L x H), as the model's decoder would.

    For each layer, `on_layer(index, layer)` is called with the loaded layer (to hook into it) and returns
    `batch(group)`, a context entered around each batch of `batch_size` sequences of that group going through
    it: the batches are those the whole model would see, so per-batch statistics come out the same. A batch goes
    through in passes of about PASS_TOKENS tokens (whole sequences): tokens of different sequences never meet in a
    causal decoder, so only the activations' size changes, not what they are.
    """
    decoder, layers = _stem(weights)
    decoder.eval()
    types = getattr(weights.config, "layer_types", None)
    embedding = fp32(weights.get("model.embed_tokens.weight"))
    hidden = [_on_disk(group_NL, embedding, weights.folder, batch_size) for group_NL in groups_NL]
    del embedding
    for index in range(len(layers)):
        layer = _load_layer(weights, layers, index)
        decoder.layers = torch.nn.ModuleList([layer])
        if types is not None:
            decoder.config.layer_types = [types[index]]
        batch = on_layer(index, layer) if on_layer else lambda group: nullcontext()
        for group, hidden_NLH in enumerate(hidden):
            step = max(1, min(batch_size, PASS_TOKENS // max(1, hidden_NLH.shape[1])))
            for start in range(0, len(hidden_NLH), batch_size):
                with batch(group):
                    for first in range(start, min(start + batch_size, len(hidden_NLH)), step):
                        rows = slice(first, min(first + step, start + batch_size))
                        # In place: a pass's input is spent once its output exists.
                        hidden_NLH[rows] = _through(decoder, layer, hidden_NLH[rows])
        layers[index] = layer.to("meta")  # frees its weights before the next layer is read
    for hidden_NLH in hidden:
        for start in range(0, len(hidden_NLH), batch_size):
            hidden_NLH[start : start + batch_size] = decoder.norm(hidden_NLH[start : start + batch_size])
    return hidden


def _on_disk(group_NL: torch.Tensor, embedding_VH: torch.Tensor, folder: Path, batch_size: int) -> torch.Tensor:
    """The group's embedded tokens (N x L x H, fp32) in a memory-mapped scratch file beside the model: the pages
    of the hidden states kept between layers are the kernel's to write back and drop, not the process's memory.
    The file is unlinked at once; the mapping keeps it until the tensor is freed."""
    shape = (*group_NL.shape, embedding_VH.shape[1])
    with tempfile.TemporaryFile(dir=folder) as scratch:
        hidden_NLH = torch.from_numpy(np.memmap(scratch, dtype=np.float32, mode="w+", shape=shape))
    for start in range(0, len(group_NL), batch_size):
        hidden_NLH[start : start + batch_size] = torch.nn.functional.embedding(
            group_NL[start : start + batch_size], embedding_VH)
    return hidden_NLH


def _through(decoder, layer, hidden_BLH: torch.Tensor) -> torch.Tensor:
    """`layer`'s output for `hidden_BLH`, run by the decoder's own forward (its mask and rotary embeddings)."""
    captured = {}
    handle = layer.register_forward_hook(
        lambda module, args, out: captured.__setitem__("out", out[0] if isinstance(out, tuple) else out))
    try:
        decoder(inputs_embeds=hidden_BLH, use_cache=False)
    finally:
        handle.remove()
    return captured["out"]


def output_head(weights: SavedWeights) -> torch.nn.Linear:
    """The model's vocabulary projection (the embedding where the two are tied and stored once)."""
    name = "lm_head.weight" if "lm_head.weight" in weights.files else "model.embed_tokens.weight"
    weight_VH = fp32(weights.get(name))
    with torch.device("meta"):
        head = torch.nn.Linear(weight_VH.shape[1], weight_VH.shape[0], bias=False)
    head.load_state_dict({"weight": weight_VH}, assign=True)
    return head

