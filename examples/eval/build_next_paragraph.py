"""Builds next_paragraph.jsonl, a HellaSwag-like multiple-choice task, from the bundled corpus.

    python examples/eval/build_next_paragraph.py        # rewrites examples/eval/next_paragraph.jsonl, same bytes

Each item is the opening lines (or sentences) of one document (`context`) and four candidate continuations
(`choices`): the lines that really follow, and the continuations of three documents of the other domains (code,
docs, dictionary, scripture), drawn at random. A language model that has learned the corpus gives the true
continuation the highest likelihood; an untrained one is near chance (25%). Each choice starts with the
separator (newline or space) that would join it to the context. The documents are those of the bundled corpus, which the example jobs train on, so this measures how
well a model learned the corpus's structure, not how it generalises beyond it.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "data" / "corpus.jsonl"
OUT = HERE / "next_paragraph.jsonl"
NUM_ITEMS = 400
NUM_CHOICES = 4
CONTEXT_CHARS = (80, 240)  # whole lines or sentences, at least / at most this many characters
CONTINUATION_CHARS = (40, 120)
SEED = 0


def pieces_of(text: str) -> tuple[list[str], str]:
    """The document's lines, or its sentences when it is one long line (scripture, dictionary entries), with the
    separator that joins them back."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        return lines, "\n"
    return [s for s in re.split(r"(?<=[.;:!?])\s+", text.strip()) if s], " "


def take(pieces: list[str], sep: str, bounds: tuple[int, int]) -> tuple[str, list[str]] | None:
    """Whole pieces from the front until at least bounds[0] characters; None if that passes bounds[1]."""
    taken: list[str] = []
    while pieces and len(sep.join(taken)) < bounds[0]:
        taken.append(pieces.pop(0))
    text = sep.join(taken)
    return (text, pieces) if bounds[0] <= len(text) <= bounds[1] else None


def split_document(text: str) -> tuple[str, str, str] | None:
    """(context, separator, true continuation), or None when the document has no such pair of pieces."""
    pieces, sep = pieces_of(text)
    head = take(pieces, sep, CONTEXT_CHARS)
    if head is None:
        return None
    tail = take(head[1], sep, CONTINUATION_CHARS)
    return None if tail is None else (head[0], sep, tail[0])


def build(corpus: Path = CORPUS, num_items: int = NUM_ITEMS, seed: int = SEED) -> list[dict]:
    """`num_items` items, as many from each domain as it has; the wrong choices come from other domains, one from
    each where there are enough (so a model that knows what follows what in each domain can tell them apart)."""
    docs = [json.loads(line) for line in corpus.read_text().splitlines() if line.strip()]
    by_domain: dict[str, list[tuple[str, str, str]]] = {}
    for doc in docs:
        piece = split_document(doc["text"])
        if piece is not None:
            by_domain.setdefault(doc["domain"], []).append(piece)
    rng = random.Random(seed)
    domains = sorted(by_domain)
    per_domain = num_items // len(domains)
    items = []
    for domain in domains:
        for context, sep, truth in rng.sample(by_domain[domain], min(per_domain, len(by_domain[domain]))):
            others = [d for d in domains if d != domain]
            picks = (others * NUM_CHOICES)[: NUM_CHOICES - 1]
            wrong = [rng.choice(by_domain[d])[2] for d in picks]
            label = rng.randrange(NUM_CHOICES)
            choices = wrong[:label] + [truth] + wrong[label:]
            items.append({"domain": domain, "context": context, "choices": [sep + c for c in choices],
                          "label": label})
    rng.shuffle(items)
    return items


def main() -> None:
    items = build()
    OUT.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    print(f"{len(items)} items -> {OUT}")


if __name__ == "__main__":
    main()
