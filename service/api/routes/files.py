"""Corpus files on the server: a user uploads theirs (streamed), lists and deletes them; an admin fills `shared/`.

    POST   /v1/files?name=corpus.jsonl          the body is the file: 201 {name, path, size, modified}
    GET    /v1/files                            the caller's uploads (?shared=true: the shared area's files)
    DELETE /v1/files/corpus.jsonl               204

An upload lands in MOEDISCO_DATA_DIR/users/<caller>/uploads/, which only the caller's jobs may read
(`data.train: users/<caller>/uploads/corpus.jsonl`, `service.jobs.access`); an admin's `?shared=true` upload lands in
`shared/`, which every user's jobs read. The body streams into a partial file, refused past MOEDISCO_MAX_UPLOAD_BYTES
or what is left of the caller's MOEDISCO_USER_QUOTA_BYTES, and is then read through as a corpus with the readers a
job uses: only a file that reads is renamed into place, and nothing of a refused or broken upload is left behind.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from starlette.concurrency import run_in_threadpool

from moedisco.io.atomic import partial_of, put_in_place
from moedisco.io.documents import SUFFIX_FORMATS, DataError, ReadReport, detect_format, read_file
from service.api.deps import CallerDep, SettingsDep
from service.core.config import Settings
from service.schemas import FilePublic, Message

router = APIRouter(prefix="/files", tags=["files"])

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NameQuery = Annotated[str, Query(description="The file's name: letters, digits, . _ -, ending in a corpus format.")]
SharedQuery = Annotated[bool, Query(description="The shared area every user's jobs read (uploads: admins only).")]
TextFieldQuery = Annotated[str, Query(description="The JSON/Parquet field that holds each document's text.")]
REFUSALS = {409: {"model": Message, "description": "A file of that name exists."},
            413: {"model": Message, "description": "Larger than the upload limit or the caller's quota left."},
            422: {"model": Message, "description": "A bad name, or a file that does not read as a corpus."}}


def _folder(settings: Settings, caller, shared: bool) -> Path:
    return settings.access.shared_dir if shared else settings.access.user_dir(caller.name) / "uploads"


def _checked_name(name: str) -> str:
    if not NAME.fullmatch(name) or Path(name).suffix not in SUFFIX_FORMATS:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"name {name[:130]!r}: letters, digits, . _ - only, ending in one of "
                            f"{', '.join(SUFFIX_FORMATS)}")
    return name


STALE_PARTIAL_S = 3600  # a partial file this old is a crashed server's leftover, not an upload in flight
MAX_JSON_BYTES = 64 << 20  # a .json array is read whole to be checked: larger corpora go as JSONL or Parquet
MAX_ROW_GROUP_BYTES = 256 << 20  # a Parquet row group is decompressed whole to be checked: a bomb stops here


def _bytes_in(folder: Path) -> int:
    """The bytes of the files in an uploads folder, uploads in flight included (so parallel ones share the quota);
    a crashed server's stale partials are removed first."""
    if not folder.is_dir():
        return 0
    total = 0
    for path in folder.iterdir():
        stat = path.lstat()
        if path.name.endswith(".partial") and time.time() - stat.st_mtime > STALE_PARTIAL_S:
            path.unlink(missing_ok=True)
        else:
            total += stat.st_size
    return total


def _room_left(settings: Settings, folder: Path, shared: bool) -> int:
    """What this upload may write: the upload limit, within what is left of the caller's quota."""
    if shared:
        return settings.max_upload_bytes
    return min(settings.max_upload_bytes, settings.user_quota_bytes - _bytes_in(folder))


def _check_expansion(path: Path, name: str, fmt: str) -> None:
    """Refuse what would take far more memory to read than it takes on disk, before reading it."""
    if fmt == "json" and path.stat().st_size > MAX_JSON_BYTES:
        raise DataError(f"{name}: a .json array over {MAX_JSON_BYTES >> 20} MB; upload it as JSONL or Parquet")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            metadata = pq.ParquetFile(path).metadata
        except Exception as error:  # pyarrow raises its own ArrowInvalid, an OSError or a ValueError
            raise DataError(f"{name}: not a Parquet file ({error})") from None
        largest = max((metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups)), default=0)
        if largest > MAX_ROW_GROUP_BYTES:
            raise DataError(f"{name}: a row group of {largest >> 20} MB uncompressed (at most "
                            f"{MAX_ROW_GROUP_BYTES >> 20} MB); write it with smaller row groups")


def _count_documents(path: Path, name: str, text_field: str) -> int:
    """Read `path` through as the corpus `name` says it is; a DataError names `name`, not the partial file."""
    report, fmt = ReadReport(), detect_format(name, "auto")
    _check_expansion(path, name, fmt)
    try:
        documents = sum(1 for text in read_file(path, fmt, text_field, False, report)
                        if text.strip())
    except DataError as error:
        raise DataError(str(error).replace(str(path), name)) from None
    if not documents:
        raise DataError(f"{name}: no documents with text found (field {text_field!r})")
    return documents


def _public(path: Path, settings: Settings) -> FilePublic:
    stat = path.stat()
    return FilePublic(name=path.name, path=str(path.relative_to(settings.access.data_dir)), size=stat.st_size,
                      modified=datetime.fromtimestamp(stat.st_mtime, timezone.utc))


@router.post("", status_code=status.HTTP_201_CREATED, response_model=FilePublic, responses=REFUSALS)
async def upload_file(request: Request, response: Response, settings: SettingsDep, caller: CallerDep,
                      name: NameQuery, shared: SharedQuery = False, text_field: TextFieldQuery = "text") -> FilePublic:
    """Upload a corpus file (JSONL, JSON, Parquet or text), streamed; it is checked as a corpus before it is kept."""
    if shared and not caller.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "only admins upload to the shared area")
    target = _folder(settings, caller, shared) / _checked_name(name)
    if target.exists():
        raise HTTPException(status.HTTP_409_CONFLICT, f"{name} exists: delete it first")
    room = _room_left(settings, target.parent, shared)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > room:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"{name}: {declared} bytes, {max(room, 0)} left "
                                                               "(MOEDISCO_MAX_UPLOAD_BYTES, MOEDISCO_USER_QUOTA_BYTES)")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_of(target)
    try:
        written = 0
        with partial.open("wb") as handle:
            async for chunk in request.stream():
                written += len(chunk)
                if written > room:
                    raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE,
                                        f"{name}: more than the {max(room, 0)} bytes left "
                                        "(MOEDISCO_MAX_UPLOAD_BYTES, MOEDISCO_USER_QUOTA_BYTES)")
                handle.write(chunk)
        try:
            await run_in_threadpool(_count_documents, partial, name, text_field)
        except DataError as error:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(error)) from None
        if not shared and _bytes_in(target.parent) > settings.user_quota_bytes:  # parallel uploads, together
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"{name}: your uploads in flight together pass "
                                                                   "MOEDISCO_USER_QUOTA_BYTES")
        if target.exists():  # another upload of the same name finished first
            raise HTTPException(status.HTTP_409_CONFLICT, f"{name} exists: delete it first")
        put_in_place(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    response.headers["Location"] = f"/v1/files/{name}" + ("?shared=true" if shared else "")
    return _public(target, settings)


@router.get("", response_model=list[FilePublic])
def list_files(settings: SettingsDep, caller: CallerDep, shared: SharedQuery = False) -> list[FilePublic]:
    """The caller's uploads, or the shared area's files: what a spec may name in data.train and data.eval."""
    folder = _folder(settings, caller, shared)
    files = sorted(path for path in folder.iterdir() if path.is_file() and not path.name.startswith(".")) \
        if folder.is_dir() else []
    return [_public(path, settings) for path in files]


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT, responses={404: {"model": Message}})
def delete_file(name: str, settings: SettingsDep, caller: CallerDep, shared: SharedQuery = False) -> Response:
    """Delete one of the caller's uploads (admins: a shared file). A queued job that reads it fails when it starts."""
    if shared and not caller.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "only admins delete from the shared area")
    target = _folder(settings, caller, shared) / _checked_name(name)
    if not target.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no file {name}")
    target.unlink()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
