"""Read, split and tokenize the corpus: the prepare stage, and the held-out sequences every stage evaluates on.

    held_out = is_held_out(text, eval_fraction=0.05, seed=0)     # the hash split: no global view needed
    tokenizer = train_tokenizer(sample_docs, spec.tokenizer)       # byte-level BPE on a bounded sample
    summary = stage_prepare(run)    # data/{train,eval}.jsonl, data/tokenizer/, data/{train,eval}_tokens/
    eval_NL = eval_sequences(spec, paths)                          # the held-out split as [N, L] sequences

Documents stream from the input files (`moedisco.io.documents`) into the split's JSON lines, then a chunk at a time
into the token shards (`moedisco.io.token_shards`); each piece is finished atomically, so an interrupted stage
resumes from the split, the tokenizer and each shard it finished. With `cluster.method: field` each line also keeps
the document's domain (`domain_field`), which the cluster stage reads instead of embeddings.

Legend: N = number of packed sequences, L = sequence length.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from moedisco.config.spec import JobSpec, TokenizerConfig
from moedisco.io.atomic import write_atomically
from moedisco.io.documents import (
    DataError,
    Document,
    DomainField,
    ReadReport,
    chunks,
    iter_records,
    iter_texts,
    split_line,
)
from moedisco.io.token_shards import TokenShard, TokenShardWriter, is_complete
from moedisco.job.layout import JobPaths
from moedisco.stages.stage_run import StageRun

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def eval_share(text: str, seed: int) -> float:
    """A document's place in [0, 1), fixed by its text and the seed: the split needs no global view."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") / 2**64


def is_held_out(text: str, eval_fraction: float, seed: int) -> bool:
    """Hash split: a document is held out when its share is below `eval_fraction`, wherever it sits in the corpus,
    so the split streams and a document keeps its side when others are added or removed."""
    return eval_fraction > 0 and eval_share(text, seed) < eval_fraction


def train_tokenizer(docs: Iterable[str], cfg: TokenizerConfig) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `docs` (the caller bounds them: `tokenizer.sample_documents`), wrapped as a
    Hugging Face fast tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    if not path.is_dir():
        raise DataError(f"tokenizer.path {path}: not a folder")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer.path {path}: the tokenizer has no eos token to separate documents")
    return tokenizer


def side_of(spec: JobSpec, text: str) -> str:
    """The split a document of `train` falls in: the hash split, unless `eval` is the held-out set."""
    cfg = spec.data
    return "eval" if cfg.eval is None and is_held_out(text, cfg.eval_fraction, spec.seed) else "train"



def domain_field(spec: JobSpec) -> DomainField | None:
    """`cluster.method: field`: the document field the split keeps as each document's domain (None: no field)."""
    cfg = spec.cluster
    if cfg.method != "field" or spec.method == "full_parameter":  # a baseline never clusters
        return None
    return DomainField(cfg.field, None if cfg.domains is None else tuple(cfg.domains))



def write_sides(spec: JobSpec, docs: Iterator[Document], handles: dict, counts: dict,
                sample: list | None = None) -> None:
    """Each document as a JSON line to its side's handle; the first `tokenizer.sample_documents` train documents'
    texts also to `sample`."""
    for doc in docs:
        name = side_of(spec, doc.text)
        handles[name].write(split_line(doc))
        counts[name] += 1
        if sample is not None and name == "train" and len(sample) < spec.tokenizer.sample_documents:
            sample.append(doc.text)



def split_partials(paths: JobPaths) -> dict[str, Path]:
    return {name: paths.texts(name).with_suffix(".jsonl.partial") for name in ("train", "eval")}



def finish_split(spec: JobSpec, paths: JobPaths, handles: dict, counts: dict, skipped: int) -> dict:
    """After `train`'s documents: `eval`'s to the held-out side, the checks, the files renamed into
    place and the split's summary written (an interrupted split leaves only .partial files)."""
    cfg = spec.data
    for doc in iter_records(cfg.eval, cfg, domain=domain_field(spec)) if cfg.eval is not None else ():
        handles["eval"].write(split_line(doc))
        counts["eval"] += 1
    for handle in handles.values():
        handle.close()
    if counts["train"] == 0 or (counts["eval"] == 0 and cfg.eval_fraction > 0):
        empty = "train" if counts["train"] == 0 else "held-out"
        raise DataError(f"{cfg.train}: no document of its {counts['train'] + counts['eval']} fell in the "
                             f"{empty} split (data.eval_fraction = {cfg.eval_fraction}); give data.eval or more "
                             "documents")
    for name, path in split_partials(paths).items():
        path.replace(paths.texts(name))
    summary = {"train_documents": counts["train"], "eval_documents": counts["eval"], "skipped": skipped}
    write_atomically(paths.split_summary, json.dumps(summary))
    return summary



def _write_split(spec: JobSpec, paths: JobPaths) -> dict:
    """Stream the input into data/{train,eval}.jsonl; returns the split's counts and the tokenizer's sample."""
    report, counts, sample = ReadReport(), {"train": 0, "eval": 0}, []
    handles = {name: path.open("w", encoding="utf-8") for name, path in split_partials(paths).items()}
    try:
        write_sides(spec, iter_records(spec.data.train, spec.data, report, domain_field(spec)), handles, counts,
                    sample)
        summary = finish_split(spec, paths, handles, counts, report.num_skipped)
    finally:
        for handle in handles.values():
            handle.close()
    return {**summary, "sample": sample}



def _tokenizer(spec: JobSpec, paths: JobPaths, sample: list[str] | None):
    if (paths.tokenizer / "tokenizer.json").is_file():
        return load_tokenizer(paths.tokenizer)
    if spec.tokenizer.path:
        tokenizer = load_tokenizer(spec.tokenizer.path)
    else:
        if sample is None:  # the split was finished by an earlier, interrupted run
            sample = list(itertools.islice(iter_texts(paths.texts("train")), spec.tokenizer.sample_documents))
        tokenizer = train_tokenizer(sample, spec.tokenizer)
    partial = paths.tokenizer.with_name("tokenizer.partial")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(paths.tokenizer, ignore_errors=True)
    partial.rename(paths.tokenizer)
    return tokenizer



def fast_encoder(tokenizer) -> Tokenizer:
    """The Rust tokenizer itself, without truncation or padding: with `encode_batch_fast` (no offsets), the same
    ids as `tokenizer(chunk)`, at twice its rate."""
    backend = tokenizer.backend_tokenizer
    if backend.truncation or backend.padding:
        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation(), backend.no_padding()
    return backend



def write_tokens(texts: Iterator[str], tokenizer, folder: Path) -> TokenShard:
    """Tokenize `texts` a chunk at a time into the shard `folder` (each document ends with EOS)."""
    eos, backend = tokenizer.eos_token_id, fast_encoder(tokenizer)
    with TokenShardWriter(folder) as writer:
        for chunk in chunks(texts):
            writer.add([e.ids for e in backend.encode_batch_fast(chunk, add_special_tokens=False)], eos=eos)
    return TokenShard.load(folder)



def split_and_tokenizer(spec: JobSpec, paths: JobPaths) -> tuple[dict, object]:
    """Prepare's first half: the split's counts and the tokenizer, each as an earlier run left it or made now."""
    paths.data.mkdir(parents=True, exist_ok=True)
    if paths.split_summary.is_file():
        split, sample = json.loads(paths.split_summary.read_text()), None
    else:
        split = _write_split(spec, paths)
        sample = split.pop("sample")
    return split, _tokenizer(spec, paths, sample)



def prepared(paths: JobPaths, split: dict, tokenizer) -> dict:
    """The prepare stage's summary, once its token shards are written."""
    return {**split, "vocab_size": len(tokenizer), "train_tokens": TokenShard.load(paths.tokens("train")).num_tokens}



def stage_prepare(run: StageRun) -> dict:
    """Read, hash-split, tokenize. Writes data/{train,eval}.jsonl, data/tokenizer/, data/{train,eval}_tokens/."""
    split, tokenizer = split_and_tokenizer(run.spec, run.paths)
    for name in ("train", "eval"):
        if not is_complete(run.paths.tokens(name)):
            write_tokens(iter_texts(run.paths.texts(name)), tokenizer, run.paths.tokens(name))
    return prepared(run.paths, split, tokenizer)


def load_corpus(paths: JobPaths, split_name: str) -> TokenShard:
    return TokenShard.load(paths.tokens(split_name))



def eval_sequences(spec: JobSpec, paths: JobPaths) -> torch.Tensor:
    return load_corpus(paths, "eval").pack(spec.data.sequence_length)
