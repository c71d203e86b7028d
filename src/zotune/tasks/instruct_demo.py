"""A small synthetic instruction dataset with checkable answers, made deterministically (no download).

Each example is a one-turn conversation: an instruction from one of a few templates (add two numbers, the next
number, a word in capitals, a word spelled backwards, repeat a phrase, the larger of two numbers) and its exact
answer, with no extra words. An instruction-tuned model answers such questions verbosely ("The sum of 12 and 30 is
42."), so tuning on them lowers the held-out loss of the bare answers quickly, and greedy answers can be scored with
exact match. Used by the chat recipe (``recipes/smollm2-instruct-mezo.yaml``) and the real-model chat test.

    python -m zotune.tasks.instruct_demo --out data/instruct     # writes train/dev/test .jsonl and task.yaml

Example:
    >>> rows = make_rows(3, seed=0)
    >>> [m["role"] for m in rows[0]["messages"]]
    ['user', 'assistant']
    >>> rows == make_rows(3, seed=0)
    True
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["SIZES", "make_rows", "write_task"]

WORDS = (
    "apple river stone cloud garden window silver forest candle rabbit summer bridge pencil ocean market "
    "yellow orange planet shadow winter castle honey mirror valley thunder"
).split()

SIZES = {"train": 400, "dev": 50, "test": 100}
"""Rows per split written by :func:`write_task`."""


def _one(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(6)
    a, b = rng.randrange(2, 60), rng.randrange(2, 60)
    word = rng.choice(WORDS)
    if kind == 0:
        return f"What is {a} plus {b}?", str(a + b)
    if kind == 1:
        return f"Which number comes right after {a * 7}?", str(a * 7 + 1)
    if kind == 2:
        return f"Write the word '{word}' in capital letters.", word.upper()
    if kind == 3:
        return f"Spell the word '{word}' backwards.", word[::-1]
    if kind == 4:
        phrase = " ".join(rng.sample(WORDS, 3))
        return f"Repeat exactly: {phrase}", phrase
    return f"Which is larger, {a} or {b + 60}?", str(b + 60)


def make_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` rows ``{"messages": [user, assistant]}`` drawn with ``random.Random(seed)`` (global RNG untouched)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question, answer = _one(rng)
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows


def write_task(folder: str | Path, sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write ``train.jsonl``, ``dev.jsonl``, ``test.jsonl`` and ``task.yaml`` (a chat task) into ``folder``.

    Splits use seeds ``seed``, ``seed + 1``, ``seed + 2``; returns the path of ``task.yaml``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = sizes or SIZES
    for i, split in enumerate(("train", "dev", "test")):
        lines = [json.dumps(r) + "\n" for r in make_rows(sizes[split], seed + i)]
        (folder / f"{split}.jsonl").write_text("".join(lines))
    spec = (
        '# A chat task: one conversation per line, {"messages": [{"role": ..., "content": ...}, ...]}.\n'
        "# Paths are relative to this file. Loss on the assistant turns; eval: loss, perplexity, F1/EM.\n"
        "name: instruct\n"
        "kind: chat\n"
        "files: {train: train.jsonl, dev: dev.jsonl, test: test.jsonl}\n"
    )
    (folder / "task.yaml").write_text(spec)
    return folder / "task.yaml"


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zotune.tasks.instruct_demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="folder to write the task into")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(write_task(a.out, seed=a.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
