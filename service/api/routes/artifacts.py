"""A job's files: list everything under its output_dir, and download one file.

    GET /v1/jobs/{id}/artifacts                         [{path, size, modified}, ...]
    GET /v1/jobs/{id}/artifacts/final/model.safetensors the file

A requested path is resolved (symlinks included) and must stay inside the job's output_dir: `../`, absolute
paths and links pointing out all answer 404, the same as a missing file, so nothing about the rest of the
server's disk can be learned through here.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse

from service.api.deps import JobDep
from service.schemas import ArtifactPublic, ArtifactsPublic, Message

router = APIRouter(prefix="/jobs", tags=["artifacts"])


def safe_artifact(root: Path, relative: str) -> Path | None:
    """The file `relative` names inside `root`, or None when it is missing or would escape `root`."""
    if "\x00" in relative:
        return None
    try:
        base = root.resolve()
        target = (base / relative).resolve()
        return target if target.is_relative_to(base) and target.is_file() else None
    except (OSError, ValueError, RuntimeError):  # too long, a symlink loop ...
        return None


def list_artifacts(root: Path) -> list[ArtifactPublic]:
    base = root.resolve()
    artifacts = []
    for folder, _, files in os.walk(base):
        for name in sorted(files):
            path = Path(folder) / name
            if safe_artifact(base, str(path.relative_to(base))) is None:  # a link that leads out
                continue
            stat = path.stat()
            artifacts.append(ArtifactPublic(path=path.relative_to(base).as_posix(), size=stat.st_size,
                                            modified=datetime.fromtimestamp(stat.st_mtime, timezone.utc)))
    return sorted(artifacts, key=lambda a: a.path)


@router.get("/{job_id}/artifacts", response_model=ArtifactsPublic, responses={404: {"model": Message}})
def read_artifacts(job: JobDep) -> ArtifactsPublic:
    """Every file under the job's output_dir (spec, metrics, cost, report, checkpoints, the final model)."""
    artifacts = list_artifacts(Path(job.output_dir))
    return ArtifactsPublic(data=artifacts, count=len(artifacts))


@router.get("/{job_id}/artifacts/{path:path}", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}}, 404: {"model": Message}})
def download_artifact(job: JobDep, path: str) -> FileResponse:
    """Download one file; `path` is relative to the job's output_dir."""
    target = safe_artifact(Path(job.output_dir), path)
    if target is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no artifact {path!r} in job {job.id}")
    return FileResponse(target, filename=target.name)
