"""Object storage: `s3://` and `gs://` URIs for the corpus, `output_dir` and `resources.storage_path`.

    is_uri("s3://bucket/corpus/*.jsonl")              # True; a plain path is False
    files = list_files("s3://bucket/corpus/*.jsonl")  # the matching objects, as URIs, sorted
    with open_input("s3://bucket/corpus/a.jsonl") as handle: ...  # a binary stream

The filesystems are pyarrow's (`pyarrow.fs.FileSystem.from_uri`), the ones Ray Data and Ray Train already use, so
no other client is needed. Credentials come from the environment, as the clouds' own SDKs read them:
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or an instance profile), AWS_REGION, and AWS_ENDPOINT_URL for an
S3-compatible store (MinIO, Ceph, R2); GOOGLE_APPLICATION_CREDENTIALS (a service-account key file) for GCS. A URI
that cannot be reached or read raises `StorageError`, which names the URI and these variables; the local side of a
copy failing raises `moedisco.io.staging.StagingError`, which names the staging folder instead.

A job folder on object storage is worked on in a local staging folder: `moedisco.io.staging`.
"""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path, PurePosixPath
from typing import IO, Any

CHUNK = 8 << 20  # bytes per read or write of a copy, and of read-ahead
SCHEMES = ("s3", "gs", "gcs")
CREDENTIALS = ("credentials come from the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and, "
               "for an S3-compatible store, AWS_ENDPOINT_URL (s3://); GOOGLE_APPLICATION_CREDENTIALS (gs://)")
LEAVING = {"", ".", ".."}  # key segments that would lead a path out of its folder, or fold into another


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


def failure(uri: str, error: Exception) -> StorageError:
    return StorageError(f"{uri}: {error}; {CREDENTIALS}")


def _uri(scheme: str, path: str) -> str:
    return f"{scheme}://{path}"


def exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as error:
        raise failure(uri, error) from None


def listing(uri: str) -> list[tuple[str, int, int]]:
    """(path inside the filesystem, size, mtime in ns) of every object under `uri`, recursively (maybe none)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as error:
        raise failure(uri, error) from None
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
        found = [p for p, _, _ in listing(_uri(scheme, prefix))
                 if p.count("/") == depth and fnmatch.fnmatchcase(p, path)]
        return sorted(_uri(scheme, p) for p in found)
    try:
        kind = fs.get_file_info(path).type
    except OSError as error:
        raise failure(uri, error) from None
    if kind == pafs.FileType.File:
        return [uri]
    return sorted(_uri(scheme, p) for p, _, _ in listing(uri) if not suffixes or PurePosixPath(p).suffix in suffixes)


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
        raise failure(str(location), error) from None


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
        raise failure(str(location), error) from None


def make_dir(location: str | Path) -> None:
    """A local folder is made; on object storage a "folder" is a key prefix, there once an object is under it."""
    if not is_uri(location):
        Path(location).mkdir(parents=True, exist_ok=True)
