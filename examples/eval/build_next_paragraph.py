"""Builds next_paragraph.jsonl, a HellaSwag-like multiple-choice task, from the bundled corpus.

    python examples/eval/build_next_paragraph.py        # rewrites examples/eval/next_paragraph.jsonl, same bytes

Each item is the opening lines of one document (`context`) and four candidate continuations (`choices`): the lines
that really follow, and the continuations of three other documents drawn at random, from any domain. A language
model that has learned the corpus gives its true continuation the highest likelihood; an untrained one is at
chance (25%). The documents are those of the bundled corpus, which the example jobs train on, so this measures how
well a model learned the corpus's structure, not how it generalises beyond it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "data" / "corpus.jsonl"
OUT = HERE / "next_paragraph.jsonl"
NUM_ITEMS = 400
NUM_CHOICES = 4
CONTEXT_CHARS = (80, 240)  # whole lines, at least / at most this many characters
CONTINUATION_CHARS = (40, 120)
SEED = 0


def take_lines(lines: list[str], bounds: tuple[int, int]) -> tuple[str, list[str]] | None:
    """Whole non-empty lines from the front until at least bounds[0] characters; None if that passes bounds[1]."""
    taken: list[str] = []
    while lines and sum(len(line) + 1 for line in taken) < bounds[0]:
        taken.append(lines.pop(0))
    text = "\n".join(line for line in taken if line.strip())
    return (text, lines) if bounds[0] <= len(text) <= bounds[1] else None


def split_document(text: str) -> tuple[str, str] | None:
    """(context, true continuation), or None when the document has no such pair of line-aligned pieces."""
    lines = [line for line in text.splitlines() if line.strip()]
    head = take_lines(lines, CONTEXT_CHARS)
    if head is None:
        return None
    context, rest = head
    tail = take_lines(rest, CONTINUATION_CHARS)
    return None if tail is None else (context, tail[0])


def build(corpus: Path = CORPUS, num_items: int = NUM_ITEMS, seed: int = SEED) -> list[dict]:
    docs = [json.loads(line) for line in corpus.read_text().splitlines() if line.strip()]
    pairs = [(doc["domain"], *piece) for doc in docs if (piece := split_document(doc["text"])) is not None]
    rng = random.Random(seed)
    chosen = rng.sample(range(len(pairs)), min(num_items, len(pairs)))
    items = []
    for index in chosen:
        domain, context, truth = pairs[index]
        others = rng.sample([i for i in range(len(pairs)) if i != index and pairs[i][2] != truth], NUM_CHOICES - 1)
        choices = [pairs[i][2] for i in others]
        label = rng.randrange(NUM_CHOICES)
        choices.insert(label, truth)
        items.append({"domain": domain, "context": context, "choices": choices, "label": label})
    return items


def main() -> None:
    items = build()
    OUT.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    print(f"{len(items)} items -> {OUT}")


if __name__ == "__main__":
    main()
