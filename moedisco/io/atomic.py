"""Atomic writes: a file or folder is written aside and renamed into place, so a reader sees the old one or the new
one, never a part (and a crash leaves only a `.partial` that nothing reads).

    write_atomically(OUTPUT / "stages/merge.json", json.dumps(summary))
    with writing(OUTPUT / "sync/round_0.safetensors") as partial:
        save_file(tensors, partial)

Object-storage pushes skip `.partial` names (`moedisco.io.staging`), so a half-written piece is never copied up.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def partial_of(path: Path, shared: bool = False) -> Path:
    """Where `path` is written before its rename: one name per writer (also per thread), or one name `shared` by
    the ranks of a sharded checkpoint, which all write into the same folder."""
    if shared:
        return path.with_name(f"{path.name}.partial")
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.partial")


def put_in_place(partial: Path, path: Path) -> None:
    """Rename a finished `partial` onto `path`; a folder replaces the old folder (a rename cannot)."""
    if partial.is_dir():
        shutil.rmtree(path, ignore_errors=True)
        partial.rename(path)
    else:
        partial.replace(path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def writing(path: Path, one_writer: bool = False) -> Iterator[Path]:
    """Write to the yielded path (a file or a folder); it becomes `path` only if the block ends without an error.
    `one_writer`: `path` has one writer at a time, so its partial has a fixed name and a retry after a crash (which
    skips the cleanup below) replaces the leftover instead of leaving a second copy beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_of(path, shared=one_writer)
    _remove(partial)
    try:
        yield partial
        put_in_place(partial, path)
    finally:
        _remove(partial)


def write_atomically(path: Path, text: str) -> None:
    with writing(path) as partial:
        partial.write_text(text)
