"""Object storage: `s3://` and `gs://` URIs for the corpus, `output_dir` and `resources.storage_path`.

    is_uri("s3://bucket/corpus/*.jsonl")              # True; a plain path is False
    files = list_files("s3://bucket/corpus/*.jsonl")  # the matching objects, as URIs, sorted
    with open_input("s3://bucket/corpus/a.jsonl") as handle: ...  # a binary stream
    local = staging_dir("s3://bucket/jobs/tiny")     # where this machine works on that job folder
    pull("s3://bucket/jobs/tiny", local); push(local, "s3://bucket/jobs/tiny")

The filesystems are pyarrow's (`pyarrow.fs.FileSystem.from_uri`), the ones Ray Data and Ray Train already use, so
no other client is needed. Credentials come from the environment, as the clouds' own SDKs read them:
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or an instance profile), AWS_REGION, and AWS_ENDPOINT_URL for an
S3-compatible store (MinIO, Ceph, R2); GOOGLE_APPLICATION_CREDENTIALS (a service-account key file) for GCS. A URI
that cannot be reached or read raises `StorageError`, which names the URI and these variables; the local side of a
copy failing (a full disk) raises `StagingError`, which names the staging folder instead.

A job folder on object storage is worked on in a local staging folder (`staging_dir`; MOEDISCO_STAGING_DIR, else
~/.cache/moedisco/staging) and copied up after every finished stage and when a job stops (`push`), and down before
a run (`pull`), so a job resumes from its bucket on another machine. Staged, not read in place, because training
reads its token shards through memory maps (`moedisco.io.token_shards.TokenShard`: `np.memmap` needs a local file) and the
stages append to and rename files, which object stores cannot do.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO, Any

from moedisco.io.atomic import write_atomically

SCHEMES = ("s3", "gs", "gcs")
CREDENTIALS = ("credentials come from the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and, "
               "for an S3-compatible store, AWS_ENDPOINT_URL (s3://); GOOGLE_APPLICATION_CREDENTIALS (gs://)")
CHUNK = 8 << 20  # bytes per read or write of a copy, and of read-ahead
PUSHED = ".pushed.json"  # in the staging folder: what `push` last copied up, so the next copies only the changes
RECORD_EVERY_S = 5.0  # `push` saves its record this often while copying, and when done
LEAVING = {"", ".", ".."}  # key segments that would lead a path out of its folder, or fold into another


class StorageError(RuntimeError):
    """Object storage that cannot be reached or read; the message names the URI and the credential variables."""


class StagingError(StorageError):
    """The local side of a push or pull failed (a full disk): the message names the staging folder, not credentials."""


class URI(str):
    """An object-storage URI in a spec (`s3://bucket/key`, `gs://bucket/key`): kept as written, never a Path,
    which would fold its `//`."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any):
        from pydantic_core import core_schema

        def validate(value: str) -> URI:
            if not is_uri(value):
                raise ValueError(f"not an object-storage URI ({', '.join(s + '://' for s in SCHEMES)})")
            return cls(value)

        return core_schema.no_info_after_validator_function(
            validate, core_schema.str_schema(pattern=rf"^({'|'.join(SCHEMES)})://"),
            serialization=core_schema.plain_serializer_function_ser_schema(str))


def is_uri(location: object) -> bool:
    return isinstance(location, str) and location.split("://", 1)[0] in SCHEMES and "://" in location


def plain_parts(uri: str) -> tuple[str, str, tuple[str, ...]]:
    """(scheme, bucket, key segments) of a URI that names a bucket and a key and nothing else; raises ValueError
    naming what else it holds. pyarrow reads filesystem options from a URI's query (`endpoint_override`, `scheme`)
    and credentials from its user info: a URI from someone else could send this machine's credentials to a host
    of their choosing. `gcs` reads as `gs`."""
    if any(c in uri for c in "?#%"):
        raise ValueError("may not hold a query, a fragment or %-escapes")
    scheme, _, rest = uri.partition("://")
    bucket, _, key = rest.partition("/")
    if scheme not in SCHEMES or not bucket or any(c in bucket for c in "@:"):
        raise ValueError(f"must be {'|'.join(SCHEMES)}://bucket/key, with no user info or port")
    segments = tuple(key.rstrip("/").split("/")) if key.rstrip("/") else ()
    if LEAVING & set(segments):
        raise ValueError("may not hold an empty, '.' or '..' key segment")
    return ("gs" if scheme == "gcs" else scheme), bucket, segments


def is_under(uri: str, root: str) -> bool:
    """Whether `uri` lies under `root` (both `plain_parts`): the same scheme and bucket, and `root`'s key
    segments leading `uri`'s, so `s3://b/ab` is not under `s3://b/a`."""
    (scheme, bucket, segments), (root_scheme, root_bucket, root_segments) = plain_parts(uri), plain_parts(root)
    return (scheme, bucket) == (root_scheme, root_bucket) and segments[: len(root_segments)] == root_segments


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for `uri`."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as error:
        raise StorageError(f"{uri}: cannot open its filesystem ({error}); {CREDENTIALS}") from None


def _failed(uri: str, error: Exception) -> StorageError:
    return StorageError(f"{uri}: {error}; {CREDENTIALS}")


def _uri(scheme: str, path: str) -> str:
    return f"{scheme}://{path}"


def exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as error:
        raise _failed(uri, error) from None


def _listing(uri: str) -> list[tuple[str, int, int]]:
    """(path inside the filesystem, size, mtime in ns) of every object under `uri`, recursively (maybe none)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as error:
        raise _failed(uri, error) from None
    return [(info.path, info.size, info.mtime_ns or 0) for info in infos if info.type == pafs.FileType.File]


def list_files(uri: str, suffixes: tuple[str, ...] = ()) -> list[str]:
    """The objects named by `uri`: the object itself, those under it as a folder (with one of `suffixes`), or
    those matching it as a glob (`*`, `?`, `[...]` within one level of the key). Sorted, as URIs."""
    import pyarrow.fs as pafs

    scheme = uri.split("://", 1)[0]
    fs, path = filesystem(uri)
    if set("*?[") & set(path):
        prefix = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
        depth = path.count("/")
        found = [p for p, _, _ in _listing(_uri(scheme, prefix))
                 if p.count("/") == depth and fnmatch.fnmatchcase(p, path)]
        return sorted(_uri(scheme, p) for p in found)
    try:
        kind = fs.get_file_info(path).type
    except OSError as error:
        raise _failed(uri, error) from None
    if kind == pafs.FileType.File:
        return [uri]
    return sorted(_uri(scheme, p) for p, _, _ in _listing(uri) if not suffixes or PurePosixPath(p).suffix in suffixes)


def open_input(location: str | Path, seekable: bool = False) -> IO[bytes]:
    """A binary stream of a local file or an object. `seekable`: random access, for readers that seek (Parquet
    reads its footer first), one ranged GET per read; otherwise a stream read ahead in 8 MB pieces, so a
    sequential reader (text, JSON lines) costs one GET per 8 MB, not one per line."""
    if not is_uri(location):
        return Path(location).open("rb")
    fs, path = filesystem(str(location))
    try:
        return fs.open_input_file(path) if seekable else fs.open_input_stream(path, compression=None, buffer_size=CHUNK)
    except OSError as error:
        raise _failed(str(location), error) from None


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
    remote_failed = lambda error: _failed(uri, error)  # noqa: E731
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
    remote_failed = lambda error: _failed(uri, error)  # noqa: E731
    local_failed = lambda error: _staging_failed(local, error)  # noqa: E731
    copied, listed = 0, set()
    for path, size, mtime in _listing(uri):
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


def join(location: str | Path, *parts: str) -> str | Path:
    """`location / parts...`: a Path stays a Path; a URI gets `/`-joined keys (a Path would fold its `//`)."""
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return Path(location).joinpath(*parts)


def remove_tree(location: str | Path) -> None:
    """Delete a folder and everything under it, locally or on object storage; a missing one is no error."""
    if not is_uri(location):
        shutil.rmtree(location, ignore_errors=True)
        return
    fs, path = filesystem(str(location))
    try:
        fs.delete_dir_contents(path, missing_dir_ok=True)
    except OSError as error:
        raise _failed(str(location), error) from None


def make_dir(location: str | Path) -> None:
    """A local folder is made; on object storage a "folder" is a key prefix, there once an object is under it."""
    if not is_uri(location):
        Path(location).mkdir(parents=True, exist_ok=True)
