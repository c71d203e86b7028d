"""Data for a run: the task, its splits, a stateless batch order, and the training objective.

The batch order is a pure function of (data seed, micro-batch index): the stream of training examples is the
concatenation of one seeded permutation per epoch, and micro-batch ``i`` is its slice ``[i·B, (i+1)·B)``. So a
resumed run needs no data-loader state to continue exactly where it stopped.

Example:
    >>> from zotune.tasks import Example
    >>> order = BatchOrder([Example(str(i), [" a", " b"], label=0) for i in range(5)], batch_size=2, seed=0)
    >>> [[ex.prompt for ex in order.batch(i)] for i in range(3)]   # the second epoch starts inside batch 2
    [['3', '0'], ['4', '2'], ['1', '4']]
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from ..methods.steppers import BatchOrder
from ..tasks import (
    Example,
    Splits,
    Task,
    accuracy_objective,
    answer_lm_loss,
    classification_loss,
    f1_objective,
    get_task,
    head_loss,
    kshot_splits,
    load_split,
    local_splits,
    mezo_splits,
    task_from_config,
)
from ..tasks.chat import chat_lm_loss, chat_token_count, require_chat_template
from ..tasks.icl import with_demos
from ..tasks.provenance import is_task_file, read_task_file
from .config import ConfigError, DataConfig

__all__ = ["BatchOrder", "build_splits", "make_objective", "resolve_protocol", "resolve_task"]

logger = logging.getLogger(__name__)


def resolve_task(spec: str, *, on_change: str = "error") -> Task:
    """A registered task name, or the path of a YAML/JSON file that describes a user task.

    Relative data paths in a task file are relative to the task file's folder (or to its ``base_dir``, itself
    relative to the file). A run's copy of its task file (``RUN/task.yaml``) carries the digests of its data files:
    ``on_change`` says what a changed file does (``error``, ``warn``, ``ignore``).
    """
    if is_task_file(spec):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"data.task: task file {path} does not exist (looked from {Path.cwd()})")
        try:
            tree = read_task_file(path)
        except ValueError as err:
            raise ConfigError(f"data.task: {err}") from None
        return task_from_config(tree, on_change=on_change)
    return get_task(spec)


def _is_user_task(task: Task) -> bool:
    """A task read from a task file: all its files are absolute paths (built-in tasks name data-folder paths)."""
    return bool(task.local) and all(Path(p).is_absolute() for p, _ in task.local.values())


def resolve_protocol(cfg: DataConfig, task: Task) -> tuple[str, str]:
    """The concrete protocol for ``cfg.protocol`` and a note saying why (empty when the user chose it).

    ``auto``: ``files`` for a task file that names its own dev (or validation) and test (or validation) files, so
    a user's splits are used as given; else ``mezo``.
    """
    if cfg.protocol != "auto":
        return cfg.protocol, ""
    own = set(task.local) if _is_user_task(task) else set()
    has_dev = bool(own & {"dev", "validation"})
    has_test = "test" in own or {"dev", "validation"} <= own  # validation is the test split when dev exists
    if has_dev and has_test:
        return "files", f"data.protocol=auto: {task.name} names its own {', '.join(sorted(own))} files, used as given"
    if _is_user_task(task):
        return "mezo", (
            f"data.protocol=auto: {task.name} names no separate dev and test files ({', '.join(sorted(own))}), so "
            "dev is drawn from train (mezo protocol); give files: {train: ..., dev: ..., test: ...} to use your own"
        )
    return "mezo", ""


def build_splits(cfg: DataConfig, task: Task) -> Splits:
    """Train/dev/test examples by the configured protocol (see :func:`draw_splits`), with ``data.demos``
    demonstrations in every prompt when set (:func:`zotune.tasks.icl.with_demos`, drawn with ``data.demos_seed``, else
    the data seed)."""
    if cfg.demos and task.kind == "chat":  # refused before any data is read
        raise ConfigError(f"data.demos={cfg.demos}: {task.name} is a chat task; demonstrations need prompts to extend")
    splits = draw_splits(cfg, task)
    if not cfg.demos:
        return splits
    try:
        return with_demos(splits, cfg.demos, cfg.seed if cfg.demos_seed is None else cfg.demos_seed)
    except ValueError as err:
        raise ConfigError(f"data.demos={cfg.demos}: {err}") from None


def draw_splits(cfg: DataConfig, task: Task) -> Splits:
    """Train/dev/test examples by the configured protocol (see :mod:`zotune.tasks.sampling`).

    ``files`` takes the task's own splits as they are (your train/dev/test files): train = train, dev = dev (else
    validation), test = test (else validation), every row, unless ``n_test`` is set (then a seed-0 draw of
    ``n_test`` test rows, said in a warning and in ``protocol``). ``auto`` (the default) is ``files`` for a task file
    that names its own dev and test files, else ``mezo`` (see :func:`resolve_protocol`). Whenever rows of a user's
    file are left out (mezo drawing from train, a capped test file), a warning says so.
    """
    protocol, note = resolve_protocol(cfg, task)
    if note:
        logger.info("%s", note)
    if protocol == "files":
        have = local_splits(task, cfg.data_dir) or ["train", "validation", "test"]
        dev_name = next((s for s in ("dev", "validation") if s in have), None)
        test_name = next((s for s in ("test", "validation") if s in have and s != dev_name), None)
        if dev_name is None or test_name is None:
            raise ConfigError(
                f"data.protocol=files: {task.name} needs a dev (or validation) and a test (or validation) split "
                f"besides train; it has: {', '.join(have)}"
            )
        train = load_split(task, "train", data_dir=cfg.data_dir)
        dev = load_split(task, dev_name, data_dir=cfg.data_dir)
        test = load_split(task, test_name, data_dir=cfg.data_dir)
        n_rows, test_note = len(test), f"test {len(test)} = all of {test_name}"
        if cfg.n_test is not None and len(test) > cfg.n_test:
            picked = sorted(random.Random(0).sample(range(len(test)), cfg.n_test))
            test = [test[i] for i in picked]
            test_note = f"test {cfg.n_test} drawn (seed 0) from {test_name} ({n_rows} rows; data.n_test={cfg.n_test})"
            logger.warning("%s: %s; unset data.n_test to use every row", task.name, test_note)
        text = f"files: train {len(train)} = all of train, dev {len(dev)} = all of {dev_name}, {test_note}"
        return Splits({"train": train, "dev": dev, "test": test}, text)
    n_test = 1000 if cfg.n_test is None else cfg.n_test
    if protocol == "kshot":
        splits = kshot_splits(task, k=cfg.k, seed=cfg.seed, data_dir=cfg.data_dir, n_test=n_test)
    else:
        if _is_user_task(task) and "dev" in task.local:
            logger.warning(
                "data.protocol=mezo: %s's dev file is not used (dev is drawn from train); use data.protocol files "
                "to use your own dev file",
                task.name,
            )
        splits = mezo_splits(
            task, seed=cfg.seed, n_train=cfg.n_train, n_dev=cfg.n_dev, n_test=n_test, data_dir=cfg.data_dir
        )
    if _is_user_task(task):  # rows of the user's own files left out: say so
        logger.warning("%s: %s", task.name, splits.protocol)
    return splits


def objective_name(cfg: DataConfig, task: Task, model_kind: str) -> str:
    """The concrete objective of ``cfg.objective`` (``auto`` resolved) for this task and model."""
    if model_kind == "seq-cls":
        if cfg.demos:
            raise ConfigError(f"data.demos={cfg.demos}: demonstrations need a causal LM, not a seq-cls model's head")
        if cfg.objective not in ("auto", "classification"):
            raise ConfigError(f"data.objective={cfg.objective!r}: a seq-cls model trains its head (auto)")
        return "head"
    if task.kind == "chat":  # the LM loss on the assistant turns (auto, lm), or the F1 of greedy answers (f1)
        if cfg.objective in ("auto", "lm"):
            return "chat"
        if cfg.objective == "f1":
            return "f1"
        raise ConfigError(
            f"data.objective={cfg.objective}: {task.name} is a chat task (use auto or lm: the loss on the assistant "
            "turns, or f1)"
        )
    if cfg.objective != "auto":
        if cfg.objective == "classification" and task.kind != "classification":
            raise ConfigError(f"data.objective=classification needs a classification task, {task.name} is {task.kind}")
        if cfg.objective == "accuracy" and task.kind == "generation":
            raise ConfigError(f"data.objective=accuracy: {task.name} is a generation task (use f1)")
        if cfg.objective == "f1" and task.kind != "generation":
            raise ConfigError(f"data.objective=f1 needs a generation task, {task.name} is {task.kind}")
        return cfg.objective
    if task.kind == "classification" and task.train_as_classification:
        return "classification"
    return "lm"


def make_objective(
    name: str, model: Any, tokenizer: Any, *, max_length: int | None, batch_size: int | None = None
) -> Callable[[Sequence[Example]], Tensor]:
    """``loss(examples)`` for the objective ``name`` (see :func:`objective_name`); lower is better."""
    kw: dict[str, Any] = {"max_length": max_length, "batch_size": batch_size}
    if name == "chat":
        require_chat_template(tokenizer)  # before any step runs
        return lambda exs: chat_lm_loss(model, tokenizer, exs, **kw)
    if name == "classification":
        return lambda exs: classification_loss(model, tokenizer, exs, **kw)
    if name == "lm":
        return lambda exs: answer_lm_loss(model, tokenizer, exs, **kw)
    if name == "head":
        return lambda exs: head_loss(model, tokenizer, exs, **kw)
    if name == "accuracy":
        return lambda exs: accuracy_objective(model, tokenizer, exs, **kw)
    if name == "f1":
        return lambda exs: f1_objective(model, tokenizer, exs, max_length=max_length)
    raise ValueError(f"unknown objective {name!r}")


def make_loss_rows(
    name: str, model: Any, tokenizer: Any, *, max_length: int | None
) -> Callable[[Sequence[Example], int], Tensor] | None:
    """The objective ``name``'s per-example form for packed forwards (:mod:`zotune.core.packed`), or None.

    Only the classification objective has one (:class:`~zotune.tasks.rows.ClassificationRows`); its rows are left
    padded, so that a forward keeps one logit per row for one-token candidates (the same scores)."""
    if name != "classification":
        return None
    from ..tasks.rows import ClassificationRows

    return ClassificationRows(model, tokenizer, max_length=max_length, padding_side="left")


def loss_weight(name: str, tokenizer: Any, max_length: int | None) -> Callable[[Sequence[Example]], int]:
    """``weight(examples)``: the items the objective ``name``'s loss is a mean over (rows; gold tokens for ``lm``),
    so that shards of a batch combine into the batch's loss (:func:`zotune.dist.sharded`)."""
    if name == "chat":
        return lambda exs: chat_token_count(tokenizer, exs, max_length)
    if name != "lm":
        return len
    from ..tasks.scoring import gold_token_count

    return lambda exs: gold_token_count(tokenizer, exs)
