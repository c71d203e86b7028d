"""The update log: every applied ZO update as (step, seeds, projected gradients, lr), a few dozen bytes a step.

With the base weights, the log *is* the fine-tuned model: :func:`zotune.core.optimizer.replay` rebuilds the weights
bit for bit (same device class) by re-running the optimizer's passes with the logged losses instead of forwards.
Files are JSON lines: a header line, then one record per step; writes are atomic.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "zotune-update-log/1"


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a fsynced temporary file and a rename: never a half-written file."""
    return atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a fsynced temporary file and a rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@dataclass
class UpdateRecord:
    """One optimizer step. ``losses`` are the closure values in call order; ``lr`` is per param group."""

    step: int
    seeds: list[int]
    grads: list[float]
    lr: list[float]
    losses: list[float] = field(default_factory=list)


@dataclass
class UpdateLog:
    """Header (how to rebuild the optimizer) plus the records."""

    header: dict[str, Any] = field(default_factory=dict)
    records: list[UpdateRecord] = field(default_factory=list)

    def append(self, record: UpdateRecord) -> None:
        self.records.append(record)

    def __len__(self) -> int:
        return len(self.records)

    def to_lines(self) -> list[str]:
        head = {"format": FORMAT, **self.header}
        return [json.dumps(head)] + [json.dumps(asdict(r)) for r in self.records]

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file + rename): an interrupted save never corrupts an existing log."""
        return atomic_write_text(path, "\n".join(self.to_lines()) + "\n")

    @classmethod
    def from_lines(cls, lines: list[str]) -> UpdateLog:
        lines = [ln for ln in lines if ln.strip()]
        if not lines:
            raise ValueError("empty update log")
        head = json.loads(lines[0])
        if head.get("format") != FORMAT:
            raise ValueError(f"not a zotune update log (format {head.get('format')!r}, expected {FORMAT!r})")
        head.pop("format")
        return cls(head, [UpdateRecord(**json.loads(ln)) for ln in lines[1:]])

    @classmethod
    def load(cls, path: str | os.PathLike) -> UpdateLog:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ValueError(f"cannot read update log {path}: {e.strerror}") from None
        try:
            return cls.from_lines(text.splitlines())
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"corrupt update log {path}: {e}") from None
