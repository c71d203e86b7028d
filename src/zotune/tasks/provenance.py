"""What data a run read: task-file paths that work from any directory, a copy of the task definition, file digests.

A run folder must not depend on the directory it was trained from, nor silently change meaning when the task file
or its data change later. So a run keeps:

- ``config.yaml`` with ``data.task`` as an absolute path (:func:`absolute_task_spec`; registered names such as
  ``sst2`` are kept as they are);
- ``RUN/task.yaml``, a copy of the task definition (:func:`snapshot_task`) with every path made absolute and a
  ``digests`` entry: the SHA-256 of each data file. Loading the copy (``resolve_task``) checks the digests, so
  ``zotune eval RUN`` refuses files that changed since the run, and ``zotune replay RUN`` warns;
- ``env.json["data"]`` (:func:`data_digests`): path, size and SHA-256 of each local file the task reads, built-in
  tasks included (their files in the benchmark data folder).

Example:
    >>> import tempfile, pathlib, yaml
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "train.csv").write_text("review,stars\\nlovely,pos\\n")
    >>> _ = (d / "t.yaml").write_text("files: {train: train.csv}\\nverbalizer: {pos: ' great'}\\n")
    >>> copy = snapshot_task(str(d / "t.yaml"), d / "run")
    >>> spec = yaml.safe_load(copy.read_text())
    >>> spec["files"]["train"] == str(d / "train.csv"), spec["digests"]["train"][:7]
    (True, 'sha256:')
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..core.log import atomic_write_text
from .base import Task

__all__ = [
    "DataChangedError",
    "TASK_COPY",
    "absolute_task_spec",
    "check_digests",
    "data_digests",
    "file_digest",
    "is_task_file",
    "read_task_file",
    "snapshot_task",
]

logger = logging.getLogger(__name__)

TASK_COPY = "task.yaml"
"""The run's copy of its task definition: ``RUN/task.yaml``."""

_SUFFIXES = (".yaml", ".yml", ".json")


class DataChangedError(ValueError):
    """A data file differs from the one a run read (its SHA-256 digest changed), or is gone."""


def is_task_file(spec: str) -> bool:
    """Whether ``data.task`` names a task file (``.yaml``, ``.yml``, ``.json``) rather than a registered task."""
    return Path(spec).suffix.lower() in _SUFFIXES


def absolute_task_spec(spec: str, base: str | os.PathLike | None = None) -> str:
    """``spec`` with a task file's path made absolute (against ``base``, default the current directory); a
    registered task name is returned unchanged."""
    if not is_task_file(spec):
        return spec
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = Path(base or Path.cwd()) / path
    return str(path.resolve())


def file_digest(path: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def read_task_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a task YAML/JSON file, with ``base_dir`` (default: the file's folder) made absolute and
    ``name`` defaulting to the file's stem. A ValueError naming the file when it is not a mapping."""
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text: save the task file as UTF-8") from None
    if path.suffix.lower() == ".json":
        import json

        try:
            tree = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    else:
        import yaml

        try:
            tree = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f":{mark.line + 1}" if mark is not None else ""
            what = " ".join(str(getattr(err, "problem", None) or err).split())
            raise ValueError(f"{path}{at}: not valid YAML ({what})") from None
    if not isinstance(tree, dict):
        raise ValueError(f"{path} must hold a mapping (name, files, template, verbalizer, ...)")
    base = Path(tree.get("base_dir") or ".")
    tree["base_dir"] = str(base if base.is_absolute() else (path.parent / base).resolve())
    tree.setdefault("name", path.stem)
    return tree


def _files(tree: dict[str, Any]) -> dict[str, str]:
    """Split -> absolute path of every file a task mapping names (``files`` and ``path``)."""
    files = dict(tree.get("files") or {})
    if tree.get("path"):
        files.setdefault("train", tree["path"])
    base = Path(tree["base_dir"])
    return {split: str(p if Path(p).is_absolute() else (base / str(p)).resolve()) for split, p in files.items()}


def snapshot_task(spec: str, run: str | os.PathLike) -> Path | None:
    """Copy the task file ``spec`` into ``RUN/task.yaml``: paths absolute, the digest of each data file added.

    Returns the copy's path, or None when ``spec`` is a registered task name (nothing to copy: the data files are
    recorded by :func:`data_digests`). Written atomically; the copy is itself a valid task file.
    """
    if not is_task_file(spec):
        return None
    import yaml

    source = Path(absolute_task_spec(spec))
    tree = read_task_file(source)
    files = _files(tree)
    missing = [p for p in files.values() if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"task {tree['name']!r} ({source}): data file {missing[0]} does not exist")
    tree.pop("path", None)
    tree["files"] = files
    tree["digests"] = {split: file_digest(p) for split, p in files.items()}
    tree["source"] = str(source)
    head = f"# copy of {source} made {time.strftime('%Y-%m-%dT%H:%M:%S')}: paths absolute, data digests checked\n"
    out = Path(run) / TASK_COPY
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, head + yaml.safe_dump(tree, sort_keys=False, allow_unicode=True))
    return out


def check_digests(files: dict[str, str], digests: dict[str, str], on_change: str = "error") -> list[str]:
    """Compare each file's SHA-256 with ``digests`` (split -> ``"sha256:..."``); return what differs.

    ``on_change``: ``"error"`` raises :class:`DataChangedError` naming the first changed file, ``"warn"`` logs a
    warning per file, ``"ignore"`` only returns the list.
    """
    if on_change not in ("error", "warn", "ignore"):
        raise ValueError(f"on_change must be 'error', 'warn' or 'ignore', got {on_change!r}")
    changed = []
    for split, expected in digests.items():
        path = files.get(split)
        if path is None:
            continue
        if not Path(path).is_file():
            changed.append(f"{split} file {path} is gone")
        elif file_digest(path) != expected:
            changed.append(f"{split} file {path} changed since the run read it (its SHA-256 differs)")
    if changed and on_change == "error":
        raise DataChangedError(
            f"{changed[0]}{f' (and {len(changed) - 1} more)' if len(changed) > 1 else ''}: evaluating it would not "
            "measure what the run measured; restore the file, or pass another task explicitly"
        )
    if on_change == "warn":
        for line in changed:
            logger.warning("%s", line)
    return changed


def data_digests(task: Task, data_dir: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """Split -> ``{"path", "bytes", "sha256"}`` of each local file ``task`` has (user tasks: the files named in the
    task file; built-in tasks: their files in the benchmark data folder, when found). Empty when the task reads
    from the hub only. For ``env.json``."""
    from .registry import local_files

    return {
        split: {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": file_digest(path)}
        for split, path in local_files(task, data_dir).items()
    }
