"""The update log: every applied ZO update as (step, seeds, projected gradients, lr), a few dozen bytes a step.

With the base weights, the log *is* the fine-tuned model: :func:`zotune.core.optimizer.replay` rebuilds the weights
bit for bit (same device class) by re-running the optimizer's passes with the logged losses instead of forwards.
Files are JSON lines: a header line, then one record per step; writes are atomic.

Integrity (format ``zotune-update-log/2``): every record line carries ``chain``, a hash of the record and of the
line before it, and the header carries the number of records and the last link. So an edited value names its line,
and a dropped line (the last one included) is an error, not a shorter fine-tune. Logs of format 1 (no chain) are
still read. The chain guards against damage and accidents, not against someone who recomputes it.

Example:
    >>> log = UpdateLog({"method": "mezo"}, [UpdateRecord(0, [7], [0.5], [1e-3], [1.0, 0.999])])
    >>> lines = log.to_lines()
    >>> json.loads(lines[0])["records"], len(UpdateLog.from_lines(lines))
    (1, 1)
    >>> UpdateLog.from_lines(lines[:1])
    Traceback (most recent call last):
    ValueError: the header says 1 record(s) but 0 follow (lines were lost: the log is truncated)
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "zotune-update-log/2"
LEGACY_FORMATS = ("zotune-update-log/1",)  # read without integrity checks
_INTEGRITY_KEYS = ("records", "chain")


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 less the umask (read without changing it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)  # no /proc: read it by setting it (and at once back)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a fsynced temporary file and a rename: never a half-written file."""
    return atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a fsynced temporary file and a rename: never a half-written file.

    The file ends with the permissions a plain ``open(path, "w")`` would leave: those of the file it replaces, else
    0o666 less the umask (a temporary file from ``mkstemp`` would be 0o600, unreadable to the rest of a group).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = new_file_mode()
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@dataclass
class UpdateRecord:
    """One optimizer step. ``losses`` are the closure values in call order; ``lr`` is per param group. ``fold``:
    the deferred low-rank updates were written into the weights after this step (a packed run settled its weights
    for an evaluation or a checkpoint; replay folds there too). Written only when true."""

    step: int
    seeds: list[int]
    grads: list[float]
    lr: list[float]
    losses: list[float] = field(default_factory=list)
    fold: bool = False


def _link(previous: str, obj: dict[str, Any]) -> str:
    """The next link of the chain: a hash of the previous link and the canonical JSON of ``obj``."""
    text = previous + "\n" + json.dumps(obj, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
        """The header line (with the record count and the last link), then one line per record with its link."""
        head = {"format": FORMAT, **{k: v for k, v in self.header.items() if k not in _INTEGRITY_KEYS}}
        link = _link("", head)
        lines = []
        for r in self.records:
            rec = asdict(r)
            if not rec["fold"]:
                del rec["fold"]  # the usual record: the same line (and checksum) as before the field existed
            link = _link(link, rec)
            lines.append(json.dumps(rec | {"chain": link}))
        return [json.dumps(head | {"records": len(self.records), "chain": link}), *lines]

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file + rename): an interrupted save never corrupts an existing log."""
        return atomic_write_text(path, "\n".join(self.to_lines()) + "\n")

    @classmethod
    def from_lines(cls, lines: list[str]) -> UpdateLog:
        """Parse (and, for format 2, check) the lines of a log; ValueError naming the first bad line."""
        numbered = [(n, ln) for n, ln in enumerate(lines, start=1) if ln.strip()]
        if not numbered:
            raise ValueError("empty update log")
        head = _parse(numbered[0][0], numbered[0][1])
        fmt = head.pop("format", None)
        if fmt != FORMAT and fmt not in LEGACY_FORMATS:
            raise ValueError(f"not a zotune update log (format {fmt!r}, expected {FORMAT!r})")
        checked = fmt == FORMAT
        count, last = head.pop("records", None), head.pop("chain", None)
        link = _link("", {"format": fmt, **head})
        records = []
        for n, text in numbered[1:]:
            obj = _parse(n, text)
            mark = obj.pop("chain", None)
            try:
                record = UpdateRecord(**obj)
            except TypeError as err:
                raise ValueError(f"line {n}: not an update record ({err})") from None
            if checked:
                link = _link(link, obj)
                if mark != link:
                    raise ValueError(
                        f"line {n} (step {obj.get('step')}) does not match its checksum: the line was edited or "
                        "damaged (or a line before it was removed)"
                    )
            records.append(record)
        if checked:
            if count != len(records):
                raise ValueError(
                    f"the header says {count} record(s) but {len(records)} follow "
                    f"({'lines were lost: the log is truncated' if len(records) < count else 'lines were added'})"
                )
            if last != link:
                raise ValueError("the last record does not match the header's checksum: the log was edited")
        return cls(head, records)

    @classmethod
    def load(cls, path: str | os.PathLike) -> UpdateLog:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except IsADirectoryError:
            raise ValueError(f"update log {path} is a folder, not a file") from None
        except OSError as e:
            raise ValueError(f"cannot read update log {path}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"corrupt update log {path}: not UTF-8 text (byte {e.start})") from None
        try:
            return cls.from_lines(text.splitlines())
        except ValueError as e:
            raise ValueError(f"corrupt update log {path}: {e}") from None


def _parse(n: int, text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"line {n}: not valid JSON ({err.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"line {n}: expected a JSON object, got {type(obj).__name__}")
    return obj
