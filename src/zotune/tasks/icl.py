"""In-context learning: sampling demonstrations and prepending them to a query within a length budget.

Example:
    >>> from zotune.tasks.base import Example
    >>> from zotune.tasks.icl import sample_demos
    >>> train = [Example(f"s{i} It was", [" terrible", " great"], label=i % 2) for i in range(10)]
    >>> demos = sample_demos(train, 4, seed=0)
    >>> sorted(d.label for d in demos)          # balanced over the labels
    [0, 0, 1, 1]
    >>> demos == sample_demos(train, 4, seed=0)  # deterministic, whatever the global RNG
    True
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .base import Example
from .sampling import Splits

__all__ = ["build_icl_prompt", "sample_demos", "with_demos"]


def _label_key(ex: Example) -> Any:
    if ex.label is not None:
        return ("label", ex.label)
    return ("gold", ex.gold)


def sample_demos(train: Sequence[Example], k: int, seed: int) -> list[Example]:
    """``k`` demonstrations drawn from ``train`` without replacement, deterministically from ``seed``.

    Uses its own ``random.Random(seed)`` (the global RNGs are neither read nor advanced). Classification examples are
    balanced over labels when possible: labels are visited round-robin (each label's examples in a seeded random
    order) until ``k`` are drawn; a label that runs out is skipped. The result is then shuffled (seeded), so the
    demonstrations do not come in label order. Unlabeled examples cannot be demonstrations.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k > len(train):
        raise ValueError(f"asked for {k} demonstrations but the training pool has only {len(train)} examples")
    if k == 0:
        return []
    if any(ex.gold is None for ex in train):
        raise ValueError("demonstrations need labelled examples (label or answers)")
    rng = random.Random(seed)
    if all(ex.kind == "classification" and ex.label is not None for ex in train):
        groups: dict[Any, list[int]] = {}
        for i, ex in enumerate(train):
            groups.setdefault(_label_key(ex), []).append(i)
        queues = []
        for key in sorted(groups, key=repr):
            idx = groups[key]
            rng.shuffle(idx)
            queues.append(idx)
        chosen: list[int] = []
        while len(chosen) < k:
            for queue in queues:
                if queue and len(chosen) < k:
                    chosen.append(queue.pop())
        rng.shuffle(chosen)
    else:
        chosen = rng.sample(range(len(train)), k)
    return [train[i] for i in chosen]


def _n_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True)["input_ids"])


def build_icl_prompt(
    demos: Sequence[Example],
    query: Example,
    tokenizer: Any,
    *,
    max_length: int | None,
    separator: str = "\n\n",
) -> tuple[Example, int]:
    """Prepend demonstrations to ``query``'s prompt, dropping whole demonstrations from the front to fit.

    The prompt is ``demo_1.demonstration() + separator + ... + demo_k.demonstration() + separator + query.prompt``.
    It fits when its tokens plus the longest candidate's (for generation: the longest answer's) tokens are at most
    ``max_length`` (for generation, pass ``max_length`` minus the tokens to generate). While it does not, the
    demonstration farthest from the query (the first) is dropped. The query is never cut: when even the bare query
    does not fit, it is returned with no demonstrations, and scoring truncates it (and counts it).

    Returns:
        ``(example, n_kept)``: a copy of ``query`` with the new prompt (same candidates, label, answers, kind; meta
        gains ``n_demos``), and the number of demonstrations kept.
    """
    texts = [d.demonstration() for d in demos]
    conts = query.candidates or query.answers or []
    tail = max((len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in conts), default=0)

    def prompt(drop: int) -> str:
        return "".join(t + separator for t in texts[drop:]) + query.prompt

    def fits(drop: int) -> bool:
        return max_length is None or _n_tokens(tokenizer, prompt(drop)) + tail <= max_length

    n = len(texts)
    drop = 0
    if max_length is not None and n:
        # a first guess from per-part lengths (tokenization is nearly additive), then exact checks around it
        budget = max_length - tail - _n_tokens(tokenizer, query.prompt)
        parts = [len(tokenizer(t + separator, add_special_tokens=False)["input_ids"]) for t in texts]
        total = sum(parts)
        while drop < n and total > budget:
            total -= parts[drop]
            drop += 1
        while drop < n and not fits(drop):
            drop += 1
        while drop > 0 and fits(drop - 1):
            drop -= 1
    kept = n - drop
    meta = {**query.meta, "n_demos": kept}
    return replace(query, prompt=prompt(drop), meta=meta), kept


def with_demos(splits: Splits, k: int, seed: int, *, separator: str = "\n\n") -> Splits:
    """Fine-tuning with demonstrations in context (LM-BFF, Gao et al., ACL 2021, with one fixed set): ``k``
    examples drawn from train (:func:`sample_demos`: seeded, balanced over the labels) leave train and are prepended
    to every train, dev and test prompt, so the model trains and is evaluated on the same kind of prompt.

    Nothing is dropped here: a prompt longer than the model's limit is cut from the left by the scorer (the farthest
    demonstration first) and counted as truncated. ``splits.protocol`` says which examples were taken.

    >>> from zotune.tasks.sampling import Splits
    >>> train = [Example(f"s{i} It was", [" terrible", " great"], label=i % 2) for i in range(6)]
    >>> test = [Example("q It was", [" terrible", " great"], label=1)]
    >>> s = with_demos(Splits({"train": train, "dev": [], "test": test}, "toy"), 2, seed=0)
    >>> len(s["train"]), s["test"][0].prompt
    (4, 's2 It was terrible\\n\\ns1 It was great\\n\\nq It was')
    """
    if k < 1:
        raise ValueError(f"k must be >= 1 demonstrations, got {k}")
    if any(ex.kind == "chat" for exs in splits.values() for ex in exs):
        raise ValueError("in-context demonstrations are not supported for chat examples")
    if k >= len(splits["train"]):
        raise ValueError(f"{k} demonstrations would leave no training example (train has {len(splits['train'])})")
    demos = sample_demos(splits["train"], k, seed)
    taken = {id(d) for d in demos}
    head = "".join(d.demonstration() + separator for d in demos)

    def prompted(ex: Example) -> Example:
        return replace(ex, prompt=head + ex.prompt, meta={**ex.meta, "n_demos": k})

    out = {
        name: [prompted(ex) for ex in exs if name != "train" or id(ex) not in taken] for name, exs in splits.items()
    }
    text = f"{splits.protocol}; {k} demonstrations drawn from train (seed {seed}) and taken out of it, in every prompt"
    return Splits(out, text)
