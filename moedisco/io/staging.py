"""Job folders on object storage, staged: worked on in a local folder, copied up after every finished stage (`push`)
and down before a run (`pull`), so a job resumes from its bucket on another machine.

    local = staging_dir("s3://bucket/jobs/tiny")     # where this machine works on that job folder
    pull("s3://bucket/jobs/tiny", local); push(local, "s3://bucket/jobs/tiny")

Staged, not read in place, because training reads its token shards through memory maps (`np.memmap` needs a local
file) and the stages append to and rename files, which object stores cannot do. A push copies what changed since the
last one (its record, `PUSHED`, holds each file's size and mtime); a pull copies down what changed in the bucket. The
local side of a copy failing (a full disk) raises `StagingError`, which names the staging folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moedisco.io.atomic import write_atomically
from moedisco.io.storage import CHUNK, LEAVING, StorageError, failure, filesystem, listing

PUSHED = ".pushed.json"  # in the staging folder: what `push` last copied up, so the next copies only the changes



RECORD_EVERY_S = 5.0  # `push` saves its record this often while copying, and when done



class StagingError(StorageError):
    """The local side of a push or pull failed (a full disk): the message names the staging folder, not credentials."""



def staging_dir(uri: str) -> Path:
    """The local folder a job folder on object storage is worked on in: one per URI, kept between runs."""
    root = Path(os.environ.get("MOEDISCO_STAGING_DIR") or Path.home() / ".cache" / "moedisco" / "staging")
    return root.joinpath(*(part.strip("/") for part in uri.split("://", 1)))



def _local_files(local: Path) -> dict[str, list[int]]:
    """Every file under `local` but the push record and unfinished pieces (an atomic write's `.partial`, an
    interrupted pull's `.X.pulling`), with its size and mtime."""
    files = {}
    for folder, _, names in os.walk(local):  # os.walk skips a folder gone mid-walk; rglob would raise
        for file in (Path(folder) / name for name in names):
            relative = file.relative_to(local).as_posix()
            if relative == PUSHED or ".partial" in relative or file.name.endswith(".pulling"):
                continue
            try:
                stat = file.stat()
            except FileNotFoundError:  # gone since the listing (a checkpoint rotated away)
                continue
            if file.is_file():
                files[relative] = [stat.st_size, stat.st_mtime_ns]
    return files



def _staging_failed(local: Path, error: OSError) -> StagingError:  # the local side: nothing about credentials
    return StagingError(f"{local}: {error} (the local staging folder; MOEDISCO_STAGING_DIR moves it)")



def _read_record(local: Path) -> dict[str, dict]:
    """The push record: per file, its local [size, mtime_ns] when last pushed or pulled and, when known, the
    object's [size, mtime_ns] then. An older record held the local pair alone."""
    record = local / PUSHED
    try:
        entries = json.loads(record.read_text()) if record.is_file() else {}
    except ValueError:  # a record torn by an older moedisco: the next push copies everything once more
        return {}
    except OSError as error:
        raise _staging_failed(local, error) from None
    return {name: entry if isinstance(entry, dict) else {"local": entry} for name, entry in entries.items()}



def _write_record(local: Path, entries: dict[str, dict]) -> None:
    """Atomically: an interrupted push leaves the old record or the new."""
    try:
        write_atomically(local / PUSHED, json.dumps(entries))
    except OSError as error:
        raise _staging_failed(local, error) from None



def _stamp(fs, path: str, failed: Callable) -> list[int]:
    """[size, mtime_ns] of an object just written (for `pull` to tell another machine's later change from it)."""
    try:
        return [(info := fs.get_file_info(path)).size, info.mtime_ns or 0]
    except OSError as error:
        raise failed(error) from None



def _copy(read: Callable[[int], bytes], write: Callable[[bytes], Any], read_failed: Callable, write_failed: Callable):
    """Copy in 8 MB pieces, telling a failing reader from a failing writer (only object storage's errors are
    about credentials)."""
    while True:
        try:
            piece = read(CHUNK)
        except OSError as error:
            raise read_failed(error) from None
        if not piece:
            return
        try:
            write(piece)
        except OSError as error:
            raise write_failed(error) from None



def push(local: Path, uri: str) -> int:
    """Copy what changed in `local` since the last push up to `uri`, and delete there what was deleted here;
    returns the number of files copied. A file is recorded as pushed only once its copy completed, so an
    interrupted push copies again what it had not finished; a file gone before its copy (a rotated checkpoint)
    is skipped."""
    fs, root = filesystem(uri)
    record = _read_record(local)
    current = _local_files(local)
    remote_failed = lambda error: failure(uri, error)  # noqa: E731
    local_failed = lambda error: _staging_failed(local, error)  # noqa: E731
    copied, written = [], time.monotonic()
    for name, stat in current.items():
        if record.get(name, {}).get("local") == stat:
            continue
        try:
            source = (local / name).open("rb")
        except FileNotFoundError:
            continue
        except OSError as error:
            raise local_failed(error) from None
        with source:
            try:
                target = fs.open_output_stream(f"{root}/{name}")
            except OSError as error:
                raise remote_failed(error) from None
            try:
                _copy(source.read, target.write, local_failed, remote_failed)
            except BaseException:
                with contextlib.suppress(OSError):  # the copy's own error is the one to see
                    target.close()
                raise
            try:
                target.close()  # the upload completes here
            except OSError as error:
                raise remote_failed(error) from None
        record[name] = {"local": stat, "remote": _stamp(fs, f"{root}/{name}", remote_failed)}
        copied.append(name)
        if time.monotonic() - written > RECORD_EVERY_S:  # a record per file would be quadratic in the files
            _write_record(local, record)
            written = time.monotonic()
    for name in set(record) - set(current):
        try:
            fs.delete_file(f"{root}/{name}")
        except FileNotFoundError:
            pass
        except OSError as error:
            raise remote_failed(error) from None
        del record[name]
    _write_record(local, record)
    return len(copied)



def _current(entry: dict | None, local_stat: list[int], remote: list[int]) -> bool:
    """Whether a local file holds the object's content: the object unchanged since our last push or pull (the file
    may be newer: work not yet pushed); with no stamp recorded, the same size and the object not newer."""
    if entry is not None and entry.get("remote") is not None:
        return list(entry["remote"]) == remote
    return local_stat[0] == remote[0] and remote[1] <= local_stat[1]



def pull(uri: str, local: Path) -> int:
    """Copy down into `local` the objects under `uri` it lacks or holds an older version of; returns how many.

    The rule: an object whose size and mtime are those the push record noted when this machine last pushed or
    pulled it has not changed since, and is skipped; one that changed (another machine pushed it) comes down.
    For a file the record does not know, the object comes down unless it has the file's size and is not newer
    than it. A pulled file gets the object's mtime; a file the bucket lost goes (`_gone_from_bucket`); an object
    whose name would leave `local` is refused. A job folder not yet on object storage pulls nothing."""
    fs, root = filesystem(uri)
    record = _read_record(local)
    remote_failed = lambda error: failure(uri, error)  # noqa: E731
    local_failed = lambda error: _staging_failed(local, error)  # noqa: E731
    copied, listed = 0, set()
    for path, size, mtime in listing(uri):
        name = path[len(root):].lstrip("/")
        if name == PUSHED or not name:
            continue
        if LEAVING & set(name.split("/")):
            raise StorageError(f"{uri}: object {name!r} would land outside the staging folder {local}")
        listed.add(name)
        target = local / name
        try:
            stat = target.stat() if target.is_file() else None
            if stat is not None and _current(record.get(name), [stat.st_size, stat.st_mtime_ns], [size, mtime]):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.pulling")
            handle = partial.open("wb")
        except OSError as error:
            raise local_failed(error) from None
        with handle:
            try:
                source = fs.open_input_stream(path)
            except OSError as error:
                raise remote_failed(error) from None
            with source:
                _copy(source.read, handle.write, remote_failed, local_failed)
        try:
            os.utime(partial, ns=(mtime, mtime))
            partial.replace(target)
            stat = target.stat()
        except OSError as error:
            raise local_failed(error) from None
        # what came down is on object storage already: the next push need not copy it back up
        record[name] = {"local": [stat.st_size, stat.st_mtime_ns], "remote": [size, mtime]}
        copied += 1
    if _gone_from_bucket(local, record, listed) or copied:  # the deletions first, whatever came down
        _write_record(local, record)
    return copied



def _gone_from_bucket(local: Path, record: dict[str, dict], listed: set[str]) -> int:
    """Delete the files the bucket had and has no more (another machine rotated a checkpoint away or re-ran a
    stage) unless changed here since: a stale marker or checkpoint would skip or resume work the bucket lost."""
    gone = 0  # how many went
    for name, entry in list(record.items()):
        if name in listed or entry.get("remote") is None:
            continue  # still there, or local work never pushed
        file = local / name
        try:
            stat = file.stat() if file.is_file() else None
            if stat is None or [stat.st_size, stat.st_mtime_ns] == list(entry["local"]):
                file.unlink(missing_ok=True)
                del record[name]
                gone += 1
        except OSError as error:
            raise _staging_failed(local, error) from None
    return gone

