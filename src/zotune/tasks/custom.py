"""User-defined tasks without code: a CSV or JSON-lines file per split, described by a dict (e.g. from YAML/JSON).

Three kinds, chosen by ``cfg["kind"]`` or by which keys are present:

- classification: a ``text`` and a ``label`` column, a ``template`` (Python format fields naming columns, e.g.
  ``"{text} It was"``; default ``"{text}"``) and a ``verbalizer`` mapping each label to its word (give the word its
  leading space: ``{"1": " great", "0": " terrible"}``; labels are compared as strings).
- generation: ``prompt`` and ``completion`` columns (or a ``template`` for the prompt); metric ``f1`` by default.
- multiple_choice: a ``candidates`` column (a JSON list, or in CSV a JSON-encoded list) and a ``label`` index;
  prompt from ``template`` (default ``"{text}"``). Candidates are used as given (mind their leading space).

Column names are configurable with ``cfg["columns"] = {"text": ..., "label": ..., "prompt": ..., "completion": ...,
"candidates": ...}``. Files: ``cfg["files"] = {"train": path, "dev": path, "validation": path, "test": path}`` (or
``cfg["path"]`` for a single ``train`` file); the format comes from ``cfg["format"]`` or the suffix (``.csv``,
``.jsonl``). Relative paths resolve against ``cfg["base_dir"]`` (default: the current directory).

Bad input is reported in one line: a missing file (:class:`DataNotFoundError`, a FileNotFoundError), a missing column
(file, line, field), a label outside the verbalizer (file, line, value, allowed labels), an empty split, a template
naming an absent field (the field and the available ones); all but the first are ValueError.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "train.csv").write_text("review,stars\\nlovely,pos\\nawful,neg\\n")
    >>> task = task_from_config({
    ...     "name": "reviews", "files": {"train": str(d / "train.csv")},
    ...     "columns": {"text": "review", "label": "stars"},
    ...     "template": "{review} It was", "verbalizer": {"neg": " terrible", "pos": " great"}})
    >>> from zotune.tasks.registry import load_split
    >>> ex = load_split(task, "train")[0]
    >>> ex.prompt, ex.candidates, ex.label, task.calibration_prompt
    ('lovely It was', [' terrible', ' great'], 1, 'N/A It was')
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

from .base import Example, Kind, Task
from .chat import check_messages
from .local import DataNotFoundError
from .readers import raw_fields, where

_COLUMNS = {
    "text": "text",
    "label": "label",
    "prompt": "prompt",
    "completion": "completion",
    "candidates": "candidates",
    "messages": "messages",
    "system": "system",
}
_KEYS = {"name", "kind", "metric", "files", "path", "format", "columns", "template", "verbalizer", "base_dir"}
_KEYS |= {"description", "train_as_classification", "system", "digests", "source"}
_KINDS = ("classification", "multiple_choice", "generation", "chat")


def _template_fields(template: str) -> list[str]:
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ValueError(f"template {template!r} is not a valid format string ({err})") from None
    for f in names:
        if f == "" or not f.replace("_", "a").replace(" ", "a").replace("-", "a").isalnum():
            raise ValueError(
                f"template {template!r}: field {{{f}}} must name a column (no indexing or positional {{}})"
            )
    return names


def _render(template: str, row: dict[str, Any], names: list[str]) -> str:
    missing = [f for f in names if f not in row or f == "meta"]
    if missing:
        have = ", ".join(sorted(raw_fields(row))) or "none"
        raise ValueError(
            f"{where(row)}: template field {{{missing[0]}}} is not a column of the file (columns: {have})"
        )
    return template.format(**{f: "" if row[f] is None else row[f] for f in names})


def _get(row: dict[str, Any], column: str, role: str) -> Any:
    if column not in row or row[column] is None:
        have = ", ".join(sorted(raw_fields(row))) or "none"
        raise ValueError(f"{where(row)}: missing {role} column {column!r} (columns: {have})")
    return row[column]


def _infer_kind(cfg: dict[str, Any], cols: dict[str, str]) -> Kind:
    if cfg.get("kind"):
        kind = cfg["kind"]
        if kind not in _KINDS:
            raise ValueError(f"task config: kind must be one of {', '.join(_KINDS)}, got {kind!r}")
        return kind
    if "verbalizer" in cfg:
        return "classification"
    if "candidates" in cfg.get("columns", {}):
        return "multiple_choice"
    if "messages" in cfg.get("columns", {}):
        return "chat"
    return "generation"


def task_from_config(cfg: dict[str, Any], *, on_change: str = "error") -> Task:
    """A :class:`Task` over the user's files described by ``cfg`` (see the module docstring).

    ``cfg["digests"]`` (split -> ``"sha256:..."``, written into a run's copy of its task file) is checked against
    the files: ``on_change`` says what a difference does (``"error"``, ``"warn"``, ``"ignore"``; see
    :func:`zotune.tasks.provenance.check_digests`). ``cfg["source"]`` (where a copy came from) is informational.

    Raises:
        DataNotFoundError: a configured file is missing.
        DataChangedError: a file's digest differs from ``cfg["digests"]`` (with ``on_change="error"``).
        ValueError: a bad config (unknown key, no files, no verbalizer for classification, bad template).
    """
    unknown = set(cfg) - _KEYS
    if unknown:
        raise ValueError(f"task config: unknown keys {sorted(unknown)} (known: {', '.join(sorted(_KEYS))})")
    name = cfg.get("name") or "custom"
    cols = _COLUMNS | dict(cfg.get("columns") or {})
    kind = _infer_kind(cfg, cols)
    files = dict(cfg.get("files") or {})
    if cfg.get("path"):
        files.setdefault("train", cfg["path"])
    if not files:
        raise ValueError(f"task config {name!r}: no data files (give 'files': {{'train': path, ...}} or 'path')")
    base = Path(cfg.get("base_dir") or Path.cwd())
    local: dict[str, tuple[str, str]] = {}
    for split, p in files.items():
        if split not in ("train", "dev", "validation", "test"):
            raise ValueError(f"task config {name!r}: unknown split {split!r} (use train, dev, validation, test)")
        path = Path(p) if Path(p).is_absolute() else (base / p)
        if not path.is_file():
            raise DataNotFoundError(f"task {name!r}: {split} file {path} does not exist")
        fmt = cfg.get("format") or ("csv" if path.suffix.lower() == ".csv" else "jsonl")
        if fmt not in ("csv", "jsonl"):
            raise ValueError(f"task config {name!r}: format must be 'csv' or 'jsonl', got {fmt!r}")
        local[split] = (str(path.resolve()), fmt)
    if cfg.get("digests"):
        from .provenance import check_digests

        check_digests({split: p for split, (p, _) in local.items()}, dict(cfg["digests"]), on_change)

    if kind == "classification":
        verbalizer = cfg.get("verbalizer")
        if not isinstance(verbalizer, dict) or not verbalizer:
            raise ValueError(f"task config {name!r}: a classification task needs 'verbalizer': {{label: word, ...}}")
        labels = [str(k).lower() if isinstance(k, bool) else str(k).strip() for k in verbalizer]
        words = [str(v) for v in verbalizer.values()]
        template = cfg.get("template") or "{" + cols["text"] + "}"
        names = _template_fields(template)
        index = {label: i for i, label in enumerate(labels)}

        def to_example(row: dict[str, Any]) -> Example:
            _get(row, cols["label"], "label")
            prompt = _render(template, row, names)
            value = row[cols["label"]]
            key = str(value).strip() if not isinstance(value, bool) else str(value).lower()
            if key not in index and isinstance(value, float) and value.is_integer():
                key = str(int(value))
            if key not in index:
                allowed = ", ".join(repr(k) for k in labels)
                raise ValueError(
                    f"{where(row)}: column {cols['label']!r}: label {value!r} is not in the verbalizer "
                    f"(allowed: {allowed})"
                )
            return Example(prompt=prompt, candidates=list(words), label=index[key], meta=_meta(row))

        calib = template.format(**dict.fromkeys(names, "N/A"))
        return Task(
            name=name,
            kind="classification",
            metric=cfg.get("metric", "accuracy"),
            to_example=to_example,
            verbalizer=words,
            local=local,
            calibration_prompt=calib,
            train_as_classification=cfg.get("train_as_classification", True),
            description=cfg.get("description", f"user task {name!r} (classification, {len(words)} labels)"),
        )

    if kind == "multiple_choice":
        template = cfg.get("template") or "{" + cols["text"] + "}"
        names = _template_fields(template)

        def to_example(row: dict[str, Any]) -> Example:
            raw = _get(row, cols["candidates"], "candidates")
            candidates = raw
            if isinstance(raw, str):
                try:
                    candidates = json.loads(raw)
                except json.JSONDecodeError:
                    candidates = None
            if not isinstance(candidates, list) or len(candidates) < 2:
                raise ValueError(
                    f"{where(row)}: column {cols['candidates']!r}: expected a list of at least 2 candidates "
                    f'(in CSV, a JSON list like [" a", " b"]), got {raw!r}'
                )
            value = _get(row, cols["label"], "label")
            try:
                label = int(value)
            except (TypeError, ValueError):
                label = -1
            if not 0 <= label < len(candidates) or isinstance(value, bool):
                raise ValueError(
                    f"{where(row)}: column {cols['label']!r}: label {value!r} is not a candidate index "
                    f"(allowed: 0..{len(candidates) - 1})"
                )
            prompt = _render(template, row, names)
            return Example(
                prompt=prompt,
                candidates=[str(c) for c in candidates],
                label=label,
                kind="multiple_choice",
                meta=_meta(row),
            )

        return Task(
            name=name,
            kind="multiple_choice",
            metric=cfg.get("metric", "accuracy"),
            to_example=to_example,
            local=local,
            train_as_classification=cfg.get("train_as_classification", False),
            description=cfg.get("description", f"user task {name!r} (multiple choice)"),
        )

    if kind == "chat":
        return _chat_task(cfg, name, cols, local)

    template = cfg.get("template")
    names = _template_fields(template) if template else []

    def to_example(row: dict[str, Any]) -> Example:
        prompt = _render(template, row, names) if template else str(_get(row, cols["prompt"], "prompt"))
        completion = _get(row, cols["completion"], "completion")
        answers = completion if isinstance(completion, list) else [str(completion)]
        return Example(prompt=prompt, answers=[str(a) for a in answers], kind="generation", meta=_meta(row))

    return Task(
        name=name,
        kind="generation",
        metric=cfg.get("metric", "f1"),
        to_example=to_example,
        local=local,
        train_as_classification=False,
        description=cfg.get("description", f"user task {name!r} (generation)"),
    )


def _chat_task(cfg: dict[str, Any], name: str, cols: dict[str, str], local: dict[str, tuple[str, str]]) -> Task:
    """A chat task: rows of ``messages``, or of a prompt (``prompt`` column or ``template``) and a ``completion``."""
    template = cfg.get("template")
    names = _template_fields(template) if template else []
    system = cfg.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"task config {name!r}: 'system' must be a string (the system prompt of every row)")

    def messages_of(row: dict[str, Any]) -> tuple[dict[str, str], ...]:
        if cols["messages"] in row and row[cols["messages"]] is not None:
            raw = row[cols["messages"]]
            if isinstance(raw, str):  # a CSV cell holds the list as JSON
                try:
                    raw = json.loads(raw)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{where(row)}: column {cols['messages']!r} is not a JSON list of messages ({err.msg})"
                    ) from None
            messages = list(raw) if isinstance(raw, list) else raw
        elif template or cols["prompt"] in row:
            prompt = _render(template, row, names) if template else row[cols["prompt"]]
            if cols["completion"] not in row or row[cols["completion"]] is None:
                have = ", ".join(sorted(raw_fields(row))) or "none"
                raise ValueError(
                    f"{where(row)}: a chat row with a prompt needs a {cols['completion']!r} column: the assistant's "
                    f"answer (columns: {have})"
                )
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row[cols["completion"]]}]
            row_system = row.get(cols["system"])
            if row_system is not None:
                messages.insert(0, {"role": "system", "content": row_system})
        else:
            have = ", ".join(sorted(raw_fields(row))) or "none"
            raise ValueError(
                f"{where(row)}: a chat row needs a {cols['messages']!r} list of {{role, content}} messages, or "
                f"{cols['prompt']!r} and {cols['completion']!r} (columns: {have})"
            )
        if (
            system is not None
            and isinstance(messages, list)
            and not any(isinstance(m, dict) and m.get("role") == "system" for m in messages)
        ):
            messages = [{"role": "system", "content": system}, *messages]
        return check_messages(messages, where(row))

    def to_example(row: dict[str, Any]) -> Example:
        messages = messages_of(row)
        users = [m["content"] for m in messages[:-1] if m["role"] != "assistant"]
        return Example(
            prompt=users[-1] if users else "",
            answers=[messages[-1]["content"]],
            kind="chat",
            meta=_meta(row),
            messages=messages,
        )

    return Task(
        name=name,
        kind="chat",
        metric=cfg.get("metric", "f1"),
        to_example=to_example,
        local=local,
        train_as_classification=False,
        description=cfg.get("description", f"user task {name!r} (chat)"),
    )


def _meta(row: dict[str, Any]) -> dict[str, Any]:
    meta = row.get("meta") or {}  # provenance wins over a column named file or line
    return {**raw_fields(row), "file": meta.get("file"), "line": meta.get("line")}
