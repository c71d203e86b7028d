"""Sampling protocols: MeZO's 1000/500/1000 splits and LM-BFF's k-shot splits.

Both are deterministic for a seed and never touch the global ``random``/``numpy``/``torch`` state (they use their own
``random.Random``). The result is a :class:`Splits` dict (``"train"``, ``"dev"``, ``"test"`` -> examples) whose
``protocol`` string says exactly how it was built, for reports.

MeZO (``large_models``): train and dev are drawn together from the train split (``n_train + n_dev`` with the seed;
dev = the last ``n_dev`` of them); test = ``n_test`` drawn from the validation split (all of it when smaller). CB and
COPA use ``n_dev = 100``. When the train split is too small MeZO only warns and shrinks: dev keeps ``n_dev``, train
gets the rest (COPA: 300 + 100). Offline, SuperGLUE has only FewGLUE's 32-example ``train.jsonl``; then (when a
local ``dev`` split exists) the FewGLUE substitute is used instead: train = ``train.jsonl``, dev = ``dev32.jsonl``,
test = the validation set (``val.jsonl``).

LM-BFF k-shot (MeZO ``medium_models``): the train split is shuffled with the seed; the first ``k`` examples of each
class form train, the next ``k`` of each class form dev. Test = the labelled test split (else the validation split),
capped at ``n_test = 1000`` examples as MeZO ``medium_models`` does. Seeds: :data:`KSHOT_SEEDS`.

The test cap draws with a fixed seed 0 (not the training seed), so every training seed is evaluated on the same
examples; test examples keep their file order.

Example:
    >>> import tempfile, pathlib
    >>> from zotune.tasks.registry import get_task
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "sst5.train"
    >>> _ = p.write_text("".join(f"{i % 5} sentence {i}\\n" for i in range(50)))
    >>> from dataclasses import replace
    >>> task = replace(get_task("sst5"), local={"train": (str(p), "lmbff"), "test": (str(p), "lmbff")})
    >>> s = kshot_splits(task, k=2, seed=13)
    >>> len(s["train"]), len(s["dev"]), len(s["test"]), sorted(e.label for e in s["train"])
    (10, 10, 50, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    >>> s.protocol
    'lm-bff k-shot (k=2 per class, seed=13): train 10 + dev 10 from train (50), test 50 = all of test (50)'
    >>> mezo_splits("sst2", seed=0).protocol   # doctest: +SKIP
    'mezo (seed=0): train 1000 + dev 500 drawn from train (67349), test 872 = all of validation (872)'
"""

from __future__ import annotations

import os
import random
import warnings
from collections import defaultdict
from typing import Any

from .base import Example, Task
from .registry import as_task, load_split, local_splits

KSHOT_SEEDS = (13, 21, 42, 87, 100)
"""LM-BFF's five data seeds."""

SMALL_DEV_TASKS = {"cb": 100, "copa": 100}
"""MeZO's ``n_dev`` overrides (the default is 500)."""


class Splits(dict):
    """``{"train": [...], "dev": [...], "test": [...]}`` with a ``protocol`` string describing how it was built."""

    def __init__(self, splits: dict[str, list[Example]], protocol: str) -> None:
        super().__init__(splits)
        self.protocol = protocol

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.items())
        return f"Splits({sizes}; {self.protocol!r})"


def _draw(n_items: int, n: int, seed: int) -> list[int]:
    """The first ``n`` indices of a seeded permutation of ``range(n_items)`` (all of them when ``n >= n_items``)."""
    order = list(range(n_items))
    random.Random(seed).shuffle(order)
    return order[:n]


def _capped(examples: list[Example], n: int, what: str) -> tuple[list[Example], str]:
    if len(examples) <= n:
        return list(examples), f"test {len(examples)} = all of {what} ({len(examples)})"
    keep = sorted(_draw(len(examples), n, 0))
    return [examples[i] for i in keep], f"test {n} drawn (seed 0) from {what} ({len(examples)})"


def _eval_split(task: Task, available: list[str]) -> str:
    if available:
        for split in ("validation", "test"):
            if split in available:
                return split
        raise ValueError(f"task {task.name!r}: the local data has no validation or test split (has: {available})")
    from .builtin import DEFAULT_HUB_SPLITS, HUB_SPLITS

    return "validation" if "validation" in HUB_SPLITS.get(task.name, DEFAULT_HUB_SPLITS) else "test"


def mezo_splits(
    task: str | Task,
    *,
    seed: int = 0,
    n_train: int = 1000,
    n_dev: int | None = None,
    n_test: int = 1000,
    data_dir: str | os.PathLike | None = None,
) -> Splits:
    """MeZO's train/dev/test (see the module docstring); ``n_dev`` defaults to 500, or 100 for CB and COPA.

    Warns (``UserWarning``) when the train split is smaller than ``n_train + n_dev``. ``protocol`` names the
    protocol actually used: ``"mezo"``, ``"mezo-shrunk"`` or ``"fewglue"``.
    """
    task = as_task(task)
    if n_dev is None:
        n_dev = SMALL_DEV_TASKS.get(task.name, 500)
    if min(n_train, n_dev, n_test) < 0:
        raise ValueError(f"sizes must be >= 0, got n_train={n_train}, n_dev={n_dev}, n_test={n_test}")
    available = local_splits(task, data_dir)
    pool = load_split(task, "train", data_dir=data_dir)
    eval_name = _eval_split(task, available)
    test, test_note = _capped(load_split(task, eval_name, data_dir=data_dir), n_test, eval_name)
    need = n_train + n_dev
    if len(pool) >= need:
        drawn = [pool[i] for i in _draw(len(pool), need, seed)]
        train, dev = drawn[:n_train], drawn[n_train:]
        protocol = f"mezo (seed={seed}): train {n_train} + dev {n_dev} drawn from train ({len(pool)}), {test_note}"
    elif "dev" in available and "dev" in task.local:  # a separate small dev file (FewGLUE dev32)
        dev_pool = load_split(task, "dev", data_dir=data_dir)
        train = [pool[i] for i in _draw(len(pool), len(pool), seed)]
        dev = [dev_pool[i] for i in _draw(len(dev_pool), len(dev_pool), seed)]
        protocol = (
            f"fewglue (seed={seed}): train = all {len(train)} of train, dev = all {len(dev)} of dev (dev32), "
            f"{test_note}; MeZO's {n_train}/{n_dev}/{n_test} needs the full train split, not available offline"
        )
        warnings.warn(
            f"{task.name}: train split has {len(pool)} < {need} examples; using the FewGLUE protocol: {protocol}",
            stacklevel=2,
        )
    else:
        if len(pool) <= n_dev:
            raise ValueError(f"{task.name}: train split has {len(pool)} examples, not more than n_dev={n_dev}")
        drawn = [pool[i] for i in _draw(len(pool), need, seed)]
        train, dev = drawn[:-n_dev] if n_dev else drawn, drawn[len(drawn) - n_dev :]
        protocol = (
            f"mezo-shrunk (seed={seed}): train split has {len(pool)} < {n_train}+{n_dev}: train {len(train)} + "
            f"dev {len(dev)} (dev = the last {n_dev} drawn, as MeZO), {test_note}"
        )
        warnings.warn(f"{task.name}: {protocol}", stacklevel=2)
    return Splits({"train": train, "dev": dev, "test": test}, protocol)


def kshot_splits(
    task: str | Task,
    k: int,
    seed: int,
    data_dir: str | os.PathLike | None = None,
    *,
    n_test: int = 1000,
) -> Splits:
    """LM-BFF's k-shot splits: ``k`` per class for train and ``k`` per class for dev, from the train split.

    Raises:
        ValueError: a task that is not classification, or a class with fewer than ``2 k`` training examples.
    """
    task = as_task(task)
    if task.kind != "classification":
        raise ValueError(f"k-shot sampling needs a classification task; {task.name!r} is {task.kind}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    pool = load_split(task, "train", data_dir=data_dir)
    by_class: dict[Any, list[int]] = defaultdict(list)
    for i in _draw(len(pool), len(pool), seed):
        by_class[pool[i].label].append(i)
    short = {c: len(ix) for c, ix in sorted(by_class.items(), key=lambda kv: str(kv[0])) if len(ix) < 2 * k}
    if short:
        raise ValueError(f"{task.name}: k={k} needs {2 * k} training examples per class; classes short: {short}")
    labels = sorted(by_class, key=lambda c: (c is None, c))
    train = [pool[i] for c in labels for i in by_class[c][:k]]
    dev = [pool[i] for c in labels for i in by_class[c][k : 2 * k]]
    # interleave deterministically so batches mix classes
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(dev)
    available = local_splits(task, data_dir)
    eval_name = "test" if (not available or "test" in available) and _has_test(task, available) else "validation"
    test, test_note = _capped(load_split(task, eval_name, data_dir=data_dir), n_test, eval_name)
    protocol = (
        f"lm-bff k-shot (k={k} per class, seed={seed}): train {len(train)} + dev {len(dev)} from train ({len(pool)}), "
        f"{test_note}"
    )
    return Splits({"train": train, "dev": dev, "test": test}, protocol)


def _has_test(task: Task, available: list[str]) -> bool:
    if available:
        return "test" in available
    from .builtin import DEFAULT_HUB_SPLITS, HUB_SPLITS

    return "test" in HUB_SPLITS.get(task.name, DEFAULT_HUB_SPLITS)
