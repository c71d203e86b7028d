"""The data model of tasks: what a task is, what an example is, and what a scorer receives.

A :class:`Task` turns raw rows into :class:`Example` objects. An example carries the prompt that a causal LM
continues, its candidate continuations (classification and multiple choice) or its gold answers (generation),
and the index of the gold candidate. Scoring (``zotune.tasks.scoring``) only ever sees examples, never raw rows,
so any task, built-in or user-defined, is scored and trained the same way.

Example:
    >>> from zotune.tasks.base import Example
    >>> ex = Example(prompt="a gorgeous film It was", candidates=[" terrible", " great"], label=1)
    >>> ex.kind, ex.gold
    ('classification', ' great')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["classification", "multiple_choice", "generation", "chat"]
Split = Literal["train", "dev", "test"]


@dataclass(frozen=True)
class Example:
    """One scored unit.

    Attributes:
        prompt: the text the model continues (template applied, no demonstrations).
        candidates: continuations to score (with their leading space, e.g. ``" great"``); None for generation.
        label: index of the gold candidate in ``candidates``; None for generation or unlabeled data.
        answers: gold answers of a generation task (SQuAD-style: any of them counts); None otherwise.
        kind: how it is scored: argmax over candidates (classification: a fixed verbalizer; multiple_choice:
            per-example candidates, and LM loss on the gold answer when trained), generation (greedy decoding), or
            chat (``messages`` formatted with the tokenizer's chat template; loss on the assistant turns, greedy
            generation of the last one).
        meta: the raw fields and provenance (file, line) for error messages and reports.
        messages: a chat example's conversation, ``({"role": ..., "content": ...}, ...)``, ending with an assistant
            turn (whose content is also ``answers[0]``); None for other kinds.
    """

    prompt: str
    candidates: list[str] | None = None
    label: int | None = None
    answers: list[str] | None = None
    kind: Kind = "classification"
    meta: dict[str, Any] = field(default_factory=dict)
    messages: tuple[dict[str, str], ...] | None = None

    @property
    def gold(self) -> str | None:
        """The gold continuation: the labelled candidate, or the first answer of a generation example."""
        if self.candidates is not None and self.label is not None:
            return self.candidates[self.label]
        return self.answers[0] if self.answers else None

    def demonstration(self) -> str:
        """The example as an in-context demonstration: prompt followed by its gold continuation."""
        gold = self.gold
        if gold is None:
            raise ValueError("an unlabeled example cannot be a demonstration")
        return self.prompt + gold


@dataclass(frozen=True)
class Task:
    """A task: how to load it, how to turn a row into an :class:`Example`, and how to score it.

    Attributes:
        name: registry name (``"sst2"``, ``"rte"``, ...).
        kind: see :class:`Example`.
        metric: ``"accuracy"`` or ``"f1"`` (generation and chat: SQuAD-normalized token F1 of greedy answers; EM,
            and for chat the held-out loss and perplexity, are also reported).
        to_example: row (a dict of raw fields, with ``meta`` provenance) -> Example; raises ValueError naming the
            file, line and field on a bad row.
        verbalizer: label words of a classification task, in label order (None for other kinds).
        hub: (dataset id, config or None) on the Hugging Face hub, for online loading.
        local: how to find each split in a local data folder: split -> (relative path, format).
        train_as_classification: default training loss (CE over candidates) for classification tasks.
        calibration_prompt: the content-free input used by calibrated scoring (e.g. ``"N/A It was"``).
        description: one line for ``--help`` and tables.
    """

    name: str
    kind: Kind
    metric: str
    to_example: Callable[[dict[str, Any]], Example]
    verbalizer: Sequence[str] | None = None
    hub: tuple[str, str | None] | None = None
    local: dict[str, tuple[str, str]] = field(default_factory=dict)
    train_as_classification: bool = True
    calibration_prompt: str | None = None
    description: str = ""
