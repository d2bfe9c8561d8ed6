"""Token shards on disk, read through memory maps, and the batch source training reads its steps from.

    with TokenShardWriter(OUTPUT / "data" / "train_tokens") as writer:   # streamed: documents in, never all in memory
        writer.add([[5, 9, 0], [7, 0]])                             # token ids of each document (EOS included)
    shard = TokenShard.load(OUTPUT / "data" / "train_tokens")       # tokens: np.memmap int32, offsets: int64
    batch_BL = SequenceSource(shard, seq_len=256).batch(step, batch_size=8, seed=0)   # a pure function of both

A shard is a folder: `tokens.bin` (every document's int32 tokens end to end), `offsets.npy` (document i is
`tokens[offsets[i]:offsets[i+1]]`) and `shard.json`, written last; the folder is written under a `.partial` name and
renamed into place, so a folder with `shard.json` is complete and a re-run redoes only missing shards. Sequences are
the token stream cut every L tokens (the ragged tail dropped), and a step's batch is a seeded shuffle per epoch
(`batch_for_step`), so a resumed run sees exactly the batches it would have seen.

Legend: N = sequences, L = sequence length, B = batch.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import torch

TOKEN_DTYPE = np.int32  # vocabularies stop at 1M ids (`TokenizerConfig.vocab_size`)
DONE_FILE = "shard.json"


class TokenShardWriter:
    """Appends documents' token ids to a shard being written; `close` (or leaving the `with`) finishes it."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        # A name of this writer's own: the workers of one sharded trainer may all make the same missing shard.
        self.partial = self.folder.with_name(f"{self.folder.name}.partial-{socket.gethostname()}-{os.getpid()}")
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        self._tokens = (self.partial / "tokens.bin").open("wb")
        self._lengths: list[np.ndarray] = []

    def add(self, documents: list[list[int]], eos: int | None = None) -> None:
        """Documents' token ids; `eos`, when given, is appended to each."""
        if documents:
            self.add_flat(*flat_ids(documents, eos=eos))

    def add_flat(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Documents given as one token array and the length of each."""
        self._tokens.write(np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE).tobytes())
        self._lengths.append(np.asarray(lengths, dtype=np.int64))

    def close(self) -> TokenShard:
        self._tokens.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        np.save(self.partial / "offsets.npy", offsets)
        summary = {"documents": len(lengths), "tokens": int(offsets[-1]), "dtype": np.dtype(TOKEN_DTYPE).name}
        (self.partial / DONE_FILE).write_text(json.dumps(summary))
        if is_complete(self.folder):  # another writer of the same shard finished first: the same documents
            shutil.rmtree(self.partial, ignore_errors=True)
            return TokenShard.load(self.folder)
        shutil.rmtree(self.folder, ignore_errors=True)  # an unfinished leftover
        try:
            self.partial.rename(self.folder)
        except OSError:
            if not is_complete(self.folder):
                raise
            shutil.rmtree(self.partial, ignore_errors=True)
        return TokenShard.load(self.folder)

    def abort(self) -> None:
        self._tokens.close()
        shutil.rmtree(self.partial, ignore_errors=True)

    def __enter__(self) -> TokenShardWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def flat_ids(documents: list[list[int]], eos: int | None = None, dtype=TOKEN_DTYPE) -> tuple[np.ndarray, np.ndarray]:
    """Documents' id lists as one flat array and each one's length (`eos` appended to each when given), built by
    numpy from one pass over the ids rather than a Python loop per token."""
    lengths = np.fromiter(map(len, documents), dtype=np.int64, count=len(documents))
    flat = np.fromiter(itertools.chain.from_iterable(documents), dtype=dtype, count=int(lengths.sum()))
    if eos is None:
        return flat, lengths
    return np.insert(flat, np.cumsum(lengths), eos), lengths + 1


def is_complete(folder: Path) -> bool:
    return (Path(folder) / DONE_FILE).is_file()


class TokenShard:
    """A finished shard, memory-mapped: reading it costs the pages touched, not the shard's size."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, tokens_path: Path | None = None):
        self.tokens, self.offsets, self.tokens_path = tokens, offsets, tokens_path

    @classmethod
    def load(cls, folder: Path) -> TokenShard:
        folder = Path(folder)
        if not is_complete(folder):
            raise FileNotFoundError(f"{folder}: no finished token shard (its data stage did not complete)")
        offsets = np.load(folder / "offsets.npy")
        count = int(offsets[-1])
        # np.memmap refuses an empty file; an empty shard (a cluster with no held-out document) is a plain array.
        tokens = np.memmap(folder / "tokens.bin", dtype=TOKEN_DTYPE, mode="r", shape=(count,)) if count else (
            np.zeros(0, dtype=TOKEN_DTYPE))
        return cls(tokens, offsets, folder / "tokens.bin" if count else None)

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def select(self, doc_ids: np.ndarray, chunk_docs: int = 65_536):
        """The tokens and lengths of the chosen documents (ascending ids), a block of `chunk_docs` documents at a
        time, so the memory used is a block's tokens however sparse the choice."""
        doc_ids = np.asarray(doc_ids, dtype=np.int64)
        if len(doc_ids) > 1 and not (np.diff(doc_ids) > 0).all():
            raise ValueError("doc_ids must be ascending and distinct")
        bounds = np.searchsorted(doc_ids, np.arange(0, self.num_documents + chunk_docs, chunk_docs))
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if lo == hi:
                continue
            ids = doc_ids[lo:hi]
            first, last = int(ids[0]), int(ids[-1])
            chosen = np.zeros(last - first + 1, dtype=bool)
            chosen[ids - first] = True
            lengths = np.diff(self.offsets[first : last + 2])
            window = self._read(int(self.offsets[first]), int(self.offsets[last + 1]))
            yield window[np.repeat(chosen, lengths)], lengths[chosen]

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) read through the file: a pass over the whole shard through the memory map would
        leave every page of it in the process's resident memory (1 GB of tokens at 1M documents)."""
        if self.tokens_path is None:
            return np.asarray(self.tokens[start:stop])
        itemsize = np.dtype(TOKEN_DTYPE).itemsize
        return np.fromfile(self.tokens_path, dtype=TOKEN_DTYPE, count=stop - start, offset=start * itemsize)

    def pack(self, seq_len: int, doc_ids: np.ndarray | None = None) -> torch.Tensor:
        """In memory, as `TokenizedCorpus.pack`: for the held-out split and other small selections."""
        from moedisco.io.documents import DataError

        if doc_ids is None:
            stream = np.asarray(self.tokens)
        else:
            stream = np.concatenate([tokens for tokens, _ in self.select(doc_ids)] or [np.zeros(0, TOKEN_DTYPE)])
        num_seqs = len(stream) // seq_len
        if num_seqs == 0:
            raise DataError(f"only {len(stream)} tokens: fewer than one sequence of {seq_len}; "
                            "lower data.sequence_length")
        return torch.from_numpy(stream[: num_seqs * seq_len].astype(np.int64)).view(num_seqs, seq_len)


class RowFile:
    """The rows of a .npy matrix on disk, read through the file a block at a time, for one pass over a matrix
    larger than memory should hold: rows read through a memory map stay in the process's resident memory until
    the kernel reclaims them (the embeddings are 1.5 GB at 1M documents); a block read into a buffer is freed with
    it. `len`, `np.asarray`, a slice, and an ascending array of row ids."""

    def __init__(self, path: Path, block_rows: int = 16_384):
        header = np.load(path, mmap_mode="r")  # the header only: shape, dtype, where the rows start
        self.path, self.shape, self.dtype, self.offset = Path(path), header.shape, header.dtype, header.offset
        self.row_items, self.block_rows = int(np.prod(self.shape[1:])), block_rows
        del header

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, len(self))
        count = max(0, stop - start) * self.row_items
        flat = np.fromfile(self.path, dtype=self.dtype, count=count,
                           offset=self.offset + start * self.row_items * self.dtype.itemsize)
        return flat.reshape(-1, *self.shape[1:])

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("RowFile slices take every row")
            return self._rows(start, stop)
        ids = np.asarray(key, dtype=np.int64)
        if len(ids) > 1 and not (np.diff(ids) > 0).all():
            raise ValueError("row ids must be ascending and distinct")
        bounds = np.searchsorted(ids, np.arange(0, len(self) + self.block_rows, self.block_rows))
        parts = [self._rows(int(ids[lo]), int(ids[hi - 1]) + 1)[ids[lo:hi] - ids[lo]]
                 for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
        return np.concatenate(parts) if parts else np.zeros((0, *self.shape[1:]), dtype=self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        rows = self._rows(0, len(self))
        return rows if dtype is None else rows.astype(dtype)


class SequenceSource:
    """A shard's token stream as [N, L] sequences, read from its memory map a batch at a time."""

    def __init__(self, shard: TokenShard, seq_len: int):
        from moedisco.io.documents import DataError

        self.shard, self.seq_len = shard, seq_len
        self.num_sequences = shard.num_tokens // seq_len
        if self.num_sequences == 0:
            raise DataError(f"only {shard.num_tokens} tokens: fewer than one sequence of {seq_len}; "
                            "lower data.sequence_length")
        self._epoch: tuple[int, torch.Tensor] | None = None  # the last epoch's permutation, reused step to step

    @property
    def shape(self) -> tuple[int, int]:
        return self.num_sequences, self.seq_len

    def __len__(self) -> int:
        return self.num_sequences

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Sequences `rows` as a LongTensor [len(rows), L], each read from the file with one `pread`: rows picked
        through the memory map would fault in the kernel's read-ahead around each one, and over a few thousand
        steps the process's resident memory would grow to the whole shard (290 MB of a 1M-document corpus's
        cluster); read into a buffer, they cost the batch."""
        starts = rows.numpy().astype(np.int64) * self.seq_len
        if self.shard.tokens_path is None:
            return torch.from_numpy(self.shard.tokens[starts[:, None] + np.arange(self.seq_len)].astype(np.int64))
        out = np.empty((len(starts), self.seq_len), dtype=TOKEN_DTYPE)
        row_bytes, itemsize = out.itemsize * self.seq_len, out.itemsize
        fd = os.open(self.shard.tokens_path, os.O_RDONLY)
        try:
            for row, start in zip(out, starts.tolist()):
                if os.preadv(fd, [row], start * itemsize) != row_bytes:
                    raise OSError(f"{self.shard.tokens_path}: short read at token {start}")
        finally:
            os.close(fd)
        return torch.from_numpy(out.astype(np.int64))

    def head(self, count: int) -> torch.Tensor:
        return self.rows(torch.arange(min(count, self.num_sequences)))

    def _permutation(self, seed: int, epoch: int) -> torch.Tensor:
        if self._epoch is None or self._epoch[0] != epoch:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            self._epoch = (epoch, torch.randperm(self.num_sequences, generator=generator))
        return self._epoch[1]

    def batch(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """The batch of optimizer step `step`: a seeded shuffle per epoch (`batch_for_step`)."""
        return self.take(torch.arange(step * batch_size, (step + 1) * batch_size), seed)

    def take(self, positions: torch.Tensor, seed: int) -> torch.Tensor:
        """The sequences at `positions` of the stream of seeded per-epoch shuffles."""
        epochs, slots = positions // self.num_sequences, positions % self.num_sequences
        picked = [self._permutation(seed, epoch)[slots[epochs == epoch]] for epoch in epochs.unique().tolist()]
        return self.rows(torch.cat(picked))


class TensorSource:
    """Sequences already in memory ([N, L]), behind the same `batch` as `SequenceSource`."""

    def __init__(self, seqs_NL: torch.Tensor):
        self.seqs_NL = seqs_NL
        self.shape = tuple(seqs_NL.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def batch(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        return batch_for_step(self.seqs_NL, step, batch_size, seed)

    def take(self, positions: torch.Tensor, seed: int) -> torch.Tensor:
        """The sequences at `positions` of the stream of seeded per-epoch shuffles (as `batch_for_step`)."""
        num_seqs = self.shape[0]
        epochs, slots = positions // num_seqs, positions % num_seqs
        rows = [torch.randperm(num_seqs, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))[
            slots[epochs == epoch]] for epoch in epochs.unique().tolist()]
        return self.seqs_NL[torch.cat(rows)]


class MixedSource:
    """Batches drawn from several sources in fixed shares (an extension's fine-tune replays the base's corpus beside
    the new one). Source i has given floor(t x B x share_i) rows before step t; the source of the largest share
    gives the rest, so every batch has B rows and over the run each source its share to within a row. Each source
    reads its rows in order from its own seeded epochs: a pure function of (seed, step), so a resumed run sees the
    same batches."""

    def __init__(self, sources: list[SequenceSource | TensorSource], shares: list[float]):
        if len(sources) != len(shares) or not sources or min(shares) < 0 or sum(shares) <= 0:
            raise ValueError(f"{len(sources)} sources need as many shares >= 0 with a positive sum, got {shares}")
        self.sources, self.shares = sources, [share / sum(shares) for share in shares]
        self.largest = max(range(len(shares)), key=lambda i: self.shares[i])
        self.shape = (sum(len(source) for source in sources), sources[0].shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def given(self, step: int, batch_size: int) -> list[int]:
        """Rows each source gave before `step`."""
        rows = [math.floor(step * batch_size * share) for share in self.shares]
        rows[self.largest] = step * batch_size - (sum(rows) - rows[self.largest])
        return rows

    def counts(self, step: int, batch_size: int) -> list[int]:
        counts = [after - before for before, after in zip(self.given(step, batch_size),
                                                          self.given(step + 1, batch_size))]
        if min(counts) < 0:
            raise ValueError(f"a batch of {batch_size} rows cannot mix {len(self.sources)} sources in shares "
                             f"{[round(s, 3) for s in self.shares]}: raise the batch size or mix fewer sources")
        return counts

    def batch(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        starts, counts = self.given(step, batch_size), self.counts(step, batch_size)
        return torch.cat([source.take(torch.arange(start, start + count), seed + index)
                          for index, (source, start, count) in enumerate(zip(self.sources, starts, counts))
                          if count])


def batch_source(train: torch.Tensor | SequenceSource | TensorSource) -> SequenceSource | TensorSource:
    """What `moedisco.training.loop.train` reads batches from: a source as it is, a tensor of sequences wrapped."""
    return TensorSource(train) if isinstance(train, torch.Tensor) else train


def batch_for_step(seqs_NL: torch.Tensor, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The batch of optimizer step `step`: a seeded shuffle per epoch, so a resumed run sees the same stream."""
    num_seqs = seqs_NL.shape[0]
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, slots = positions // num_seqs, positions % num_seqs
    rows = []
    for epoch in epochs.unique().tolist():
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        permutation = torch.randperm(num_seqs, generator=generator)
        rows.append(permutation[slots[epochs == epoch]])
    return seqs_NL[torch.cat(rows)]
