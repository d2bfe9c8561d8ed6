"""lm-evaluation-harness hooks of the `next_paragraph` task (see next_paragraph.yaml): its data is the JSONL file
next to this one, so the task runs offline from any working directory."""

from pathlib import Path

import datasets

DATA = Path(__file__).resolve().parent / "next_paragraph.jsonl"


def load(**_kwargs) -> datasets.DatasetDict:
    return datasets.load_dataset("json", data_files={"test": str(DATA)})
