"""The task registry and split loading, from local files (``shared/data`` layout) or the Hugging Face hub.

Split names, one vocabulary for every task (what exists depends on the task and the source; nothing is aliased to
a different set of examples):

- ``"train"``: the training set (SuperGLUE locally: FewGLUE's 32-example ``train.jsonl``, except RTE whose full
  2,490-example train set is GLUE's ``train.tsv``).
- ``"validation"``: the official labelled validation set, what MeZO tests on (GLUE ``dev.tsv``, SuperGLUE
  ``val.jsonl``, the hub's ``validation``). For GLUE tasks ``"dev"`` names the same file (GLUE calls it dev).
- ``"dev"``: a separate small selection set where the source ships one (FewGLUE ``dev32.jsonl``; LM-BFF
  ``stsa.fine.dev``).
- ``"test"``: a labelled test set (LM-BFF ``*.test``, TREC ``TREC.test.all``, IMDB test). GLUE/SuperGLUE test sets
  are unlabelled and are not exposed.

Example:
    >>> from zotune.tasks.registry import TASKS, get_task, load_split
    >>> "sst2" in TASKS and get_task("SST-2").name
    'sst2'
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "train.tsv"
    >>> _ = p.write_text("sentence\\tlabel\\na gorgeous film \\t1\\n")
    >>> ex = load_split("sst2", "train", path=p)[0]
    >>> ex.prompt, ex.candidates, ex.label, ex.meta["line"]
    ('a gorgeous film It was', [' terrible', ' great'], 1, 2)
    >>> len(load_split("sst2", "validation"))   # doctest: +SKIP
    872
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from .base import Example, Task
from .builtin import BUILTIN, DEFAULT_HUB_SPLITS, HUB_SPLITS
from .local import DataNotFoundError, find_data_dir
from .readers import read_rows

SPLITS = ("train", "dev", "validation", "test")
Source = Literal["auto", "local", "hub"]

_REGISTRY: dict[str, Task] = dict(BUILTIN)
TASKS: tuple[str, ...] = tuple(_REGISTRY)
"""Names of the built-in tasks."""

_ALIASES = {"sst-2": "sst2", "sst-5": "sst5", "wsc.fixed": "wsc", "squad_v1": "squad"}
_GLUE = {"sst2"}  # tasks whose local validation file is GLUE's dev.tsv ("dev" names it too)


def _key(name: str) -> str:
    key = name.strip().lower()
    return _ALIASES.get(key, key.replace("-", "").replace("_", ""))


def task_names() -> list[str]:
    """Names of all registered tasks: the built-in :data:`TASKS` and those added with :func:`register_task`."""
    return sorted(t.name for t in _REGISTRY.values())


def get_task(name: str) -> Task:
    """The registered task called ``name`` (case-insensitive; ``"SST-2"`` = ``"sst2"``)."""
    key = _key(name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def register_task(task: Task, *, overwrite: bool = False) -> Task:
    """Add a task (e.g. from :func:`zotune.tasks.custom.task_from_config`) to the registry; returns it."""
    key = _key(task.name)
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"task {task.name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[key] = task
    return task


def as_task(task: str | Task) -> Task:
    """The task itself, or the registered task of that name."""
    return task if isinstance(task, Task) else get_task(task)


def local_entry(task: Task, split: str) -> tuple[str, str] | None:
    """The task's local (path, format) of ``split`` (GLUE's ``dev`` falls back to ``validation``); None if none."""
    if split in task.local:
        return task.local[split]
    if split == "dev" and task.name in _GLUE:
        return task.local.get("validation")
    return None


def _format_of(path: Path) -> str:
    name = path.name.lower()
    for suffix, fmt in ((".tsv", "glue_tsv"), (".jsonl.gz", "jsonl.gz"), (".jsonl", "jsonl"), (".csv", "csv")):
        if name.endswith(suffix):
            return fmt
    return "lmbff"


def data_dir_or_none(data_dir: str | os.PathLike | None) -> Path | None:
    """``data_dir`` (which must be valid), else the data folder found, else None (an error under $ZOTUNE_DATA)."""
    if data_dir is not None:
        return find_data_dir(data_dir)  # an explicit folder must be valid
    try:
        return find_data_dir()
    except DataNotFoundError:
        if os.environ.get("ZOTUNE_DATA"):
            raise
        return None


def local_files(task: str | Task, data_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Split -> file of each split of ``task`` that exists locally (absolute paths of user tasks, else under the
    data folder), in :data:`SPLITS` order."""
    task = as_task(task)
    root = None
    out: dict[str, Path] = {}
    for split in SPLITS:
        entry = local_entry(task, split)
        if entry is None:
            continue
        path = Path(entry[0])
        if not path.is_absolute():
            root = root or data_dir_or_none(data_dir)
            if root is None:
                continue
            path = root / path
        if path.is_file():
            out[split] = path
    return out


def local_splits(task: str | Task, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Splits of ``task`` whose files exist locally (absolute paths of user tasks, else under the data folder)."""
    return list(local_files(task, data_dir))


def load_split(
    task: str | Task,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    path: str | os.PathLike | None = None,
    source: Source = "auto",
) -> list[Example]:
    """The examples of one split of ``task``, in file (or hub) order; nothing is dropped or truncated.

    Args:
        task: a registered name or a :class:`Task`.
        split: ``"train"``, ``"dev"``, ``"validation"`` or ``"test"`` (see the module docstring).
        data_dir: the benchmark data folder (default: :func:`find_data_dir`).
        path: read this file instead (format from its suffix: ``.tsv`` GLUE, ``.jsonl``/``.jsonl.gz``, ``.csv``,
            anything else ``<label> <text>`` lines; MultiRC and ReCoRD use their SuperGLUE formats).
        source: ``"local"`` (files only), ``"hub"`` (Hugging Face ``datasets``), or ``"auto"``: local files when the
            task has them (user tasks, or the data folder is found), else the hub.

    Raises:
        DataNotFoundError: a missing file, or no local data and the hub loader is unavailable.
        ValueError: an unknown split, a split the local data does not have, or a bad row (naming file and line).
    """
    task = as_task(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if source not in ("auto", "local", "hub"):
        raise ValueError(f"source must be 'auto', 'local' or 'hub', got {source!r}")
    if path is not None:
        fmt = local_entry(task, "train")[1] if task.name in ("multirc", "record") else _format_of(Path(path))
        return _examples(task, read_rows(path, fmt), f"{path}")
    if source != "hub":
        entry = local_entry(task, split)
        if entry is not None and Path(entry[0]).is_absolute():
            return _examples(task, read_rows(entry[0], entry[1]), entry[0])
        if task.local and all(Path(p).is_absolute() for p, _ in task.local.values()):
            have = ", ".join(task.local)
            raise ValueError(f"task {task.name!r} has no {split!r} split (its files: {have})")
        root = data_dir_or_none(data_dir) if task.local else None
        if root is not None:
            available = local_splits(task, root)
            if split in available:
                file = root / entry[0]
                return _examples(task, read_rows(file, entry[1]), str(file))
            if available or source == "local":
                have = ", ".join(available) or "none"
                raise ValueError(
                    f"task {task.name!r} has no {split!r} split in the local data at {root} (available: {have}); "
                    "use zotune.tasks.sampling to build train/dev/test from what exists"
                )
        if source == "local":
            raise DataNotFoundError(
                f"task {task.name!r}: no local data for split {split!r} (set ZOTUNE_DATA or pass path=)"
            )
    return _examples(task, _hub_rows(task, split), f"hub:{task.hub}")


def _examples(task: Task, rows: list[dict[str, Any]], origin: str) -> list[Example]:
    examples = [task.to_example(row) for row in rows]
    if not examples:
        raise ValueError(f"{origin}: no examples (empty split) for task {task.name!r}")
    return examples


def _hub_rows(task: Task, split: str) -> list[dict[str, Any]]:
    """Rows of ``split`` from the Hugging Face hub (needs ``datasets`` and network access)."""
    if task.hub is None:
        raise DataNotFoundError(f"task {task.name!r} has no local file for split {split!r} and no hub dataset")
    splits = HUB_SPLITS.get(task.name, DEFAULT_HUB_SPLITS)
    hub_split = splits.get(split, "validation" if split == "dev" and task.name in _GLUE else None)
    if hub_split is None:
        raise ValueError(f"task {task.name!r} has no {split!r} split on the hub (available: {', '.join(splits)})")
    try:
        import datasets  # lazy: an optional dependency
    except ImportError:
        raise DataNotFoundError(
            f"task {task.name!r}: no local data, and loading {task.hub[0]} from the Hugging Face hub needs "
            "`pip install datasets` (or set ZOTUNE_DATA to a local data folder)"
        ) from None
    repo, config = task.hub
    try:
        ds = datasets.load_dataset(repo, config, split=hub_split)
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one clear line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataNotFoundError(
            f"task {task.name!r}: could not load {repo}{'/' + config if config else ''} [{hub_split}] from the "
            f"Hugging Face hub (unreachable or missing: {first}); set ZOTUNE_DATA to a local data folder"
        ) from None
    origin = f"hf:{repo}{'/' + config if config else ''}:{hub_split}"
    return [dict(row) | {"meta": {"file": origin, "line": i + 1}} for i, row in enumerate(ds)]
