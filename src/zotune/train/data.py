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
from .config import ConfigError, DataConfig

__all__ = ["BatchOrder", "build_splits", "make_objective", "resolve_task"]


def resolve_task(spec: str) -> Task:
    """A registered task name, or the path of a YAML/JSON file that describes a user task."""
    path = Path(spec)
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise ConfigError(f"data.task: task file {path} does not exist")
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data[: err.start].count(b"\n") + 1
            raise ConfigError(f"data.task: {path}:{line}: not UTF-8 text: save the task file as UTF-8") from None
        if path.suffix.lower() == ".json":
            import json

            try:
                tree = json.loads(text)
            except json.JSONDecodeError as err:
                raise ConfigError(f"data.task: {path}:{err.lineno}: not valid JSON ({err.msg})") from None
        else:
            import yaml

            try:
                tree = yaml.safe_load(text)
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                at = f":{mark.line + 1}" if mark is not None else ""
                what = " ".join(str(getattr(err, "problem", None) or err).split())
                raise ConfigError(f"data.task: {path}{at}: not valid YAML ({what})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"data.task: {path} must hold a mapping (name, files, template, verbalizer, ...)")
        tree.setdefault("base_dir", str(path.parent))
        tree.setdefault("name", path.stem)
        return task_from_config(tree)
    return get_task(spec)


def build_splits(cfg: DataConfig, task: Task) -> Splits:
    """Train/dev/test examples by the configured protocol (see :mod:`zotune.tasks.sampling`).

    ``files`` takes the task's own splits as they are (your train/dev/test files): train = train, dev = dev (else
    validation), test = test (else validation), the test capped at ``n_test`` by the same seed-0 draw as the
    other protocols.
    """
    if cfg.protocol == "files":
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
        if len(test) > cfg.n_test:
            picked = sorted(random.Random(0).sample(range(len(test)), cfg.n_test))
            test = [test[i] for i in picked]
        protocol = f"files: train {len(train)} = {task.name} train, dev {len(dev)} = {dev_name}, test {len(test)}"
        return Splits({"train": train, "dev": dev, "test": test}, protocol + f" from {test_name}")
    if cfg.protocol == "kshot":
        return kshot_splits(task, k=cfg.k, seed=cfg.seed, data_dir=cfg.data_dir, n_test=cfg.n_test)
    return mezo_splits(
        task, seed=cfg.seed, n_train=cfg.n_train, n_dev=cfg.n_dev, n_test=cfg.n_test, data_dir=cfg.data_dir
    )


def objective_name(cfg: DataConfig, task: Task, model_kind: str) -> str:
    """The concrete objective of ``cfg.objective`` (``auto`` resolved) for this task and model."""
    if model_kind == "seq-cls":
        if cfg.objective not in ("auto", "classification"):
            raise ConfigError(f"data.objective={cfg.objective!r}: a seq-cls model trains its head (auto)")
        return "head"
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


def loss_weight(name: str, tokenizer: Any, max_length: int | None) -> Callable[[Sequence[Example]], int]:
    """``weight(examples)``: the items the objective ``name``'s loss is a mean over (rows; gold tokens for ``lm``),
    so that shards of a batch combine into the batch's loss (:func:`zotune.dist.sharded`)."""
    if name != "lm":
        return len
    from ..tasks.scoring import gold_token_count

    return lambda exs: gold_token_count(tokenizer, exs)
