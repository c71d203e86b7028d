"""Dev and test evaluation during a run: sharded over ranks, logged as ``eval`` records.

Example (see :func:`zotune.tasks.evaluate` for what is measured)::

    >>> from zotune.train.evaluation import Evaluator
    >>> ev = Evaluator(model, tokenizer, dev=splits["dev"], test=splits["test"], metric="accuracy")  # doctest: +SKIP
    >>> ev.run("dev", step=0, forwards=0)["accuracy"]  # doctest: +SKIP
    0.585
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import dist as zd
from ..tasks import Example, evaluate

__all__ = ["Evaluator", "evaluate_sharded"]


def evaluate_sharded(model: Any, tokenizer: Any, examples: Sequence[Example], **kw: Any) -> dict[str, Any]:
    """:func:`~zotune.tasks.evaluate` with each rank scoring its :func:`~zotune.dist.shard` of ``examples``; the
    metrics (means over examples) are combined from every rank's (sum, count), the same on every rank."""
    if zd.world() == 1:
        return evaluate(model, tokenizer, examples, **kw)
    part = list(examples)[zd.shard(len(examples))]
    res = evaluate(model, tokenizer, part, **kw) if part else {"n": 0}
    keys = ("accuracy", "f1", "em")
    row = [res.get(k, 0.0) * res["n"] for k in keys] + [float(k in res) for k in keys]
    row += [res["n"], res.get("n_truncated", 0), res.get("seconds", 0.0)]
    row += [res.get("loss", 0.0) * res.get("n_tokens", 0), res.get("n_tokens", 0)]  # a token-mean loss (chat)
    table = zd.all_gather_values(row)
    n = sum(r[6] for r in table)
    out = {"n": int(n), "n_truncated": int(sum(r[7] for r in table)), "seconds": max(r[8] for r in table)}
    for i, k in enumerate(keys):
        if any(r[3 + i] for r in table):
            out[k] = sum(r[i] for r in table) / max(n, 1)
    tokens = sum(r[10] for r in table)
    if tokens:
        out["loss"] = sum(r[9] for r in table) / tokens
        out["perplexity"] = math.exp(min(out["loss"], 700.0))
        out["n_tokens"] = int(tokens)
    return out


@dataclass
class Evaluator:
    """The run's dev and test sets and how they are scored; :meth:`run` evaluates one and returns its record.

    Attributes:
        metric: the key that selects the best weights (``accuracy``, or ``f1`` for generation tasks).
        write: where records go (the run's :class:`~zotune.train.rundir.Metrics`).
        say: how a one-line summary reaches the user.
    """

    model: Any
    tokenizer: Any
    dev: Sequence[Example]
    test: Sequence[Example]
    metric: str
    batch_size: int = 32
    max_length: int | None = None
    write: Callable[[dict[str, Any]], None] = lambda record: None
    say: Callable[[str], None] = lambda text: None

    def run(self, split: str, step: int, forwards: int, label: str | None = None) -> dict[str, Any]:
        """Evaluate ``split`` ("dev" or "test") now; log and return the record (the metric, n, seconds, ...)."""
        examples = self.dev if split == "dev" else self.test
        res = evaluate_sharded(
            self.model, self.tokenizer, examples, batch_size=self.batch_size, max_length=self.max_length
        )
        rec = {"kind": "eval", "step": step, "split": split, "forwards": forwards}
        keys = ("accuracy", "f1", "em", "loss", "perplexity", "n_tokens", "n", "n_truncated", "seconds")
        rec |= {k: res[k] for k in keys if k in res}
        self.write(rec)
        what = label or ("zero-shot" if step == 0 else f"step {step}")
        self.say(f"{what}: {split} {self.metric} {rec[self.metric]:.4f} (n={rec['n']}, {rec['seconds']:.0f} s)")
        return rec
