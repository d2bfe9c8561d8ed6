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
that cannot be reached or read raises `StorageError`, which names the URI and these variables.

A job folder on object storage is worked on in a local staging folder (`staging_dir`; MOEDISCO_STAGING_DIR, else
~/.cache/moedisco/staging) and copied up after every finished stage (`push`), and down before a run (`pull`), so a
job resumes from its bucket on another machine. Staged, not read in place, because training reads its token shards
through memory maps (`moedisco.shards.TokenShard`: `np.memmap` needs a local file) and the stages append to and
rename files, which object stores cannot do.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import IO, Any

SCHEMES = ("s3", "gs", "gcs")
CREDENTIALS = ("credentials come from the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and, "
               "for an S3-compatible store, AWS_ENDPOINT_URL (s3://); GOOGLE_APPLICATION_CREDENTIALS (gs://)")
PUSHED = ".pushed.json"  # in the staging folder: what `push` last copied up, so the next copies only the changes


class StorageError(RuntimeError):
    """Object storage that cannot be reached or read; the message names the URI and the credential variables."""


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


def _listing(uri: str) -> list[tuple[str, int]]:
    """(path inside the filesystem, size) of every object under `uri`, recursively; none when there is none."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as error:
        raise _failed(uri, error) from None
    return [(info.path, info.size) for info in infos if info.type == pafs.FileType.File]


def list_files(uri: str, suffixes: tuple[str, ...] = ()) -> list[str]:
    """The objects named by `uri`: the object itself, those under it as a folder (with one of `suffixes`), or
    those matching it as a glob (`*`, `?`, `[...]` within one level of the key). Sorted, as URIs."""
    import pyarrow.fs as pafs

    scheme = uri.split("://", 1)[0]
    fs, path = filesystem(uri)
    if set("*?[") & set(path):
        prefix = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
        depth = path.count("/")
        found = [p for p, _ in _listing(_uri(scheme, prefix))
                 if p.count("/") == depth and fnmatch.fnmatchcase(p, path)]
        return sorted(_uri(scheme, p) for p in found)
    try:
        kind = fs.get_file_info(path).type
    except OSError as error:
        raise _failed(uri, error) from None
    if kind == pafs.FileType.File:
        return [uri]
    return sorted(_uri(scheme, p) for p, _ in _listing(uri) if not suffixes or PurePosixPath(p).suffix in suffixes)


def open_input(location: str | Path) -> IO[bytes]:
    """A binary stream of a local file or an object."""
    if not is_uri(location):
        return Path(location).open("rb")
    fs, path = filesystem(str(location))
    try:
        return fs.open_input_file(path)  # seekable: Parquet reads its footer first
    except OSError as error:
        raise _failed(str(location), error) from None


def staging_dir(uri: str) -> Path:
    """The local folder a job folder on object storage is worked on in: one per URI, kept between runs."""
    root = Path(os.environ.get("MOEDISCO_STAGING_DIR") or Path.home() / ".cache" / "moedisco" / "staging")
    scheme, path = uri.split("://", 1)
    return root / scheme / path.strip("/")


def _local_files(local: Path) -> dict[str, list[int]]:
    """Every file under `local` but the push record and unfinished pieces, with its size and mtime."""
    files = {}
    for file in local.rglob("*"):
        relative = file.relative_to(local).as_posix()
        if file.is_file() and relative != PUSHED and ".partial" not in relative:
            stat = file.stat()
            files[relative] = [stat.st_size, stat.st_mtime_ns]
    return files


def push(local: Path, uri: str) -> int:
    """Copy what changed in `local` since the last push up to `uri`, and delete there what was deleted here;
    returns the number of files copied."""
    fs, root = filesystem(uri)
    record = local / PUSHED
    pushed = json.loads(record.read_text()) if record.is_file() else {}
    current = _local_files(local)
    changed = [name for name, stat in current.items() if pushed.get(name) != stat]
    try:
        for name in changed:
            with (local / name).open("rb") as source, fs.open_output_stream(f"{root}/{name}") as target:
                shutil.copyfileobj(source, target, length=8 << 20)
        for name in set(pushed) - set(current):
            fs.delete_file(f"{root}/{name}")
    except OSError as error:
        raise _failed(uri, error) from None
    record.write_text(json.dumps(current))
    return len(changed)


def pull(uri: str, local: Path) -> int:
    """Copy the objects under `uri` that `local` lacks (or holds at another size) down into it; returns how many.
    A job folder not yet on object storage pulls nothing."""
    fs, root = filesystem(uri)
    copied = []
    try:
        for path, size in _listing(uri):
            name = path[len(root):].lstrip("/")
            target = local / name
            if target.is_file() and target.stat().st_size == size:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.pulling")
            with fs.open_input_stream(path) as source, partial.open("wb") as handle:
                shutil.copyfileobj(source, handle, length=8 << 20)
            partial.replace(target)
            copied.append(name)
    except OSError as error:
        raise _failed(uri, error) from None
    if copied:  # what came down is on object storage already: the next push need not copy it back up
        record = local / PUSHED
        pushed = json.loads(record.read_text()) if record.is_file() else {}
        current = _local_files(local)
        record.write_text(json.dumps({**pushed, **{name: current[name] for name in copied if name in current}}))
    return len(copied)


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
