"""Readers of the local file formats: each yields raw rows (dicts) carrying their provenance under ``"meta"``.

A row is a dict of the raw fields (named as on the Hugging Face hub, so a task's ``to_example`` serves both sources)
plus ``row["meta"] = {"file": str, "line": int}`` (1-based line of the row in its file). Formats:

- ``glue_tsv``: TSV with a header (``sentence\\tlabel``; ``sentence1\\tsentence2\\tlabel\\tidx``), no quoting.
- ``jsonl``: one JSON object a line (SuperGLUE BoolQ, CB, COPA, RTE, WSC, WiC; user files). ``jsonl.gz`` too (IMDB).
- ``multirc_jsonl``: SuperGLUE MultiRC, one passage a line, expanded to one row per answer
  (``paragraph``, ``question``, ``answer``, ``label``, as on the hub).
- ``record_jsonl``: SuperGLUE ReCoRD, one passage a line, expanded to one row per query
  (``passage``, ``query``, ``entities`` (sorted, deduplicated), ``answers`` (sorted, deduplicated), as on the hub).
- ``lmbff``: ``<label> <text>`` lines (LM-BFF / sent-conv-torch: SST-5, TREC, MR, CR, MPQA, Subj).
- ``csv``: CSV with a header (user files).

Example:
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "sst5.train"
    >>> _ = p.write_text("4 a gorgeous film\\n0 a mess\\n")
    >>> rows = read_rows(p, "lmbff")
    >>> rows[1]["label"], rows[1]["text"], rows[1]["meta"]["line"]
    (0, 'a mess', 2)
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import sys
from pathlib import Path
from typing import Any

from .local import DataNotFoundError

FORMATS = ("glue_tsv", "jsonl", "jsonl.gz", "multirc_jsonl", "record_jsonl", "lmbff", "csv")


def where(row: dict[str, Any]) -> str:
    """``"file:line"`` of a row, for error messages."""
    meta = row.get("meta") or {}
    return f"{meta.get('file', '<row>')}:{meta.get('line', '?')}"


def raw_fields(row: dict[str, Any]) -> dict[str, Any]:
    """The raw fields of a row, without its ``meta``."""
    return {k: v for k, v in row.items() if k != "meta"}


def field(row: dict[str, Any], name: str, *alternatives: str) -> Any:
    """``row[name]`` (or the first present alternative); a ValueError naming file, line and field if absent."""
    for key in (name, *alternatives):
        if key in row and row[key] is not None:
            return row[key]
    names = " or ".join(repr(k) for k in (name, *alternatives))
    have = ", ".join(sorted(raw_fields(row))) or "none"
    raise ValueError(f"{where(row)}: missing field {names} (fields: {have})")


def _meta(path: Path, line: int, **extra: Any) -> dict[str, Any]:
    return {"file": str(path), "line": line, **extra}


def _json_line(path: Path, n: int, text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _json_lines(path: Path, gz: bool = False):
    opener = gzip.open if gz else open
    with _utf8(path, gz), opener(path, "rt", encoding="utf-8") as f:
        for n, text in enumerate(f, start=1):
            if text.strip():
                yield n, _json_line(path, n, text)


class _utf8:  # noqa: N801 (a context manager)
    """Turn a UnicodeDecodeError while reading ``path`` into a ValueError naming the file, the line and the fix."""

    def __init__(self, path: Path, gz: bool = False) -> None:
        self.path, self.gz = path, gz

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, err: Any, tb: Any) -> None:
        if kind is not None and issubclass(kind, UnicodeDecodeError):
            raise _not_utf8(self.path, self.gz) from None


def _not_utf8(path: Path, gz: bool = False) -> ValueError:
    """The error for a file that is not UTF-8: its first bad line (found by rereading it) and how to convert it."""
    opener = gzip.open if gz else open
    with opener(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return ValueError(
                    f"{path}:{n}: byte 0x{raw[err.start]:02x} is not UTF-8 (a Latin-1 or Windows-1252 file?): save "
                    f"the file as UTF-8, e.g. iconv -f latin1 -t utf-8 {path} > {path.stem}-utf8{path.suffix}"
                )
    return ValueError(f"{path}: not UTF-8 text: save the file as UTF-8")


class _no_field_limit:  # noqa: N801 (a context manager)
    """Lift the csv module's field size limit (131,072 characters by default) while a file is read: a long text is
    data, not an error. The limit is process-wide, so the previous one is put back after."""

    def __enter__(self) -> None:
        self.old = csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

    def __exit__(self, *exc: Any) -> None:
        csv.field_size_limit(self.old)


def _cells(path: Path, n: int, row: dict[Any, Any], header: list[str]) -> None:
    """A ValueError when a CSV/TSV row has more cells than its header (the extra ones would be dropped silently)."""
    if None in row:
        extra = len(row[None])
        raise ValueError(
            f"{path}:{n}: {len(header) + extra} cells, but the header has {len(header)} columns (quote a field "
            'that holds the separator, e.g. "a, b")'
        )


def read_rows(path: str | os.PathLike, fmt: str) -> list[dict[str, Any]]:
    """All rows of a file in format ``fmt`` (see the module docstring), in file order, each with ``meta``.

    Raises:
        DataNotFoundError: the file is missing.
        ValueError: an unknown format or a malformed line (naming file and line).
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r} for {path} (known: {', '.join(FORMATS)})")
    if not path.is_file():
        raise DataNotFoundError(f"missing data file {path}")
    rows: list[dict[str, Any]] = []
    if fmt == "glue_tsv":
        with _utf8(path), _no_field_limit(), path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            for n, row in enumerate(reader, start=2):
                _cells(path, n, row, reader.fieldnames or [])
                rows.append(
                    {k: (v.strip() if isinstance(v, str) else v) for k, v in row.items()} | {"meta": _meta(path, n)}
                )
    elif fmt == "csv":
        with _utf8(path), _no_field_limit(), path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            last = 1
            try:
                for row in reader:
                    start, last = last + 1, reader.line_num
                    _cells(path, start, row, reader.fieldnames or [])
                    rows.append(dict(row) | {"meta": _meta(path, start)})
            except csv.Error as err:
                raise ValueError(f"{path}:{reader.line_num}: not valid CSV ({err})") from None
    elif fmt in ("jsonl", "jsonl.gz"):
        rows = [obj | {"meta": _meta(path, n)} for n, obj in _json_lines(path, gz=fmt == "jsonl.gz")]
    elif fmt == "lmbff":
        with path.open(encoding="utf-8", errors="replace") as f:
            for n, text in enumerate(f, start=1):
                text = text.strip()
                if not text:
                    continue
                label, _, sentence = text.partition(" ")
                if not label.lstrip("-").isdigit():
                    raise ValueError(f"{path}:{n}: expected '<label> <text>' with an integer label, got {label!r}")
                rows.append({"label": int(label), "text": sentence.strip(), "meta": _meta(path, n)})
    elif fmt == "multirc_jsonl":
        for n, obj in _json_lines(path):
            base = {"meta": _meta(path, n)}
            passage = field(obj | base, "passage")
            text = field(passage | base, "text")
            for qi, q in enumerate(field(passage | base, "questions")):
                for ai, a in enumerate(field(q | base, "answers")):
                    rows.append(
                        {
                            "paragraph": text,
                            "question": field(q | base, "question"),
                            "answer": field(a | base, "text"),
                            "label": a.get("label"),
                            "idx": {"paragraph": obj.get("idx"), "question": q.get("idx"), "answer": a.get("idx")},
                            "meta": _meta(path, n, question_index=qi, answer_index=ai),
                        }
                    )
    elif fmt == "record_jsonl":
        for n, obj in _json_lines(path):
            base = {"meta": _meta(path, n)}
            passage = field(obj | base, "passage")
            text = field(passage | base, "text")
            # official offsets are inclusive at both ends
            entities = sorted({text[e["start"] : e["end"] + 1] for e in field(passage | base, "entities")})
            for qi, qa in enumerate(field(obj | base, "qas")):
                answers = sorted({a["text"] for a in qa.get("answers", [])})
                rows.append(
                    {
                        "passage": text,
                        "query": field(qa | base, "query"),
                        "entities": entities,
                        "answers": answers,
                        "idx": {"passage": obj.get("idx"), "query": qa.get("idx")},
                        "meta": _meta(path, n, query_index=qi),
                    }
                )
    return rows
