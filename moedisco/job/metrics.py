"""Metrics as JSON lines in `OUTPUT/metrics.jsonl`: one record per logged step or finished stage.

    writer = MetricsWriter(OUTPUT / "metrics.jsonl")
    writer.write({"stage": "submodel", "expert": 0, "step": 50, "loss": 5.1, "eval_loss": 5.3})
    records = read_metrics(OUTPUT / "metrics.jsonl", stage="submodel")

Appends are one `write` of one line to a file opened in append mode, so several processes (Ray workers on one
machine) can share the file without interleaving partial lines.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from moedisco.job.registry import STAGE_NAMES

log = logging.getLogger(__name__)


class MetricsWriter:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if record.get("stage") not in STAGE_NAMES:
            raise ValueError(f"unknown stage {record.get('stage')!r}; expected one of {STAGE_NAMES}")
        line = json.dumps({"time": round(time.time(), 3), **record}) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def read_metrics(path: Path, stage: str | None = None) -> list[dict]:
    """The records of `path` (of one `stage`), oldest first. A line that is not a JSON object (being written, or
    torn by concurrent appends on a network filesystem) is skipped with a warning naming it, never an error."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError:  # not written yet
        return []
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()  # being appended right now: not torn, just not there yet
    records, torn = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            torn.append(number)
    if torn:
        log.warning("%s: skipped %d torn line(s): %s", path, len(torn), ", ".join(map(str, torn[:10])))
    return [r for r in records if stage is None or r.get("stage") == stage]
