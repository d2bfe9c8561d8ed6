"""Metrics as JSON lines in `OUTPUT/metrics.jsonl`: one record per logged step or finished stage.

    writer = MetricsWriter(OUTPUT / "metrics.jsonl")
    writer.write({"stage": "submodel", "expert": 0, "step": 50, "loss": 5.1, "eval_loss": 5.3})
    records = read_metrics(OUTPUT / "metrics.jsonl", stage="submodel")

Appends are one `write` of one line to a file opened in append mode, so several processes (Ray workers on one
machine) can share the file without interleaving partial lines.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from moedisco.stages import STAGE_NAMES


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
    path = Path(path)
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if stage is None or r.get("stage") == stage]
