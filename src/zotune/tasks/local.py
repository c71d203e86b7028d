"""Local benchmark data (the layout of ``shared/data``): GLUE TSV, SuperGLUE JSON lines, LM-BFF, IMDB.

The data folder is found from ``$ZOTUNE_DATA``, else ``../shared/data`` relative to the current directory or to
this checkout. Data is read in place, never copied.

Example:
    >>> from zotune.tasks import read_sst2
    >>> rows = read_sst2("dev", limit=2)      # doctest: +SKIP
    >>> rows[0]["label"] in (0, 1)            # doctest: +SKIP
    True
"""

from __future__ import annotations

import csv
import os
from pathlib import Path


class DataNotFoundError(FileNotFoundError):
    """The benchmark data folder or one of its files is missing."""


def find_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The folder holding ``glue/``, ``superglue/``, ``lm-bff/`` and ``imdb/``.

    An explicit folder (argument, else ``$ZOTUNE_DATA``) must be valid: it never falls back to another one.
    Otherwise ``../shared/data`` is looked for beside the current directory and beside this checkout.
    """
    chosen = explicit or os.environ.get("ZOTUNE_DATA")
    if chosen:
        if not (Path(chosen) / "glue").is_dir():
            source = "given" if explicit else "from $ZOTUNE_DATA"
            raise DataNotFoundError(f"data folder {chosen} ({source}) has no glue/ folder: not the benchmark data")
        return Path(chosen).resolve()
    repo = Path(__file__).resolve().parents[3]  # src/zotune/tasks/local.py -> checkout root
    candidates = [Path.cwd() / ".." / "shared" / "data", repo / ".." / "shared" / "data"]
    for c in candidates:
        if (c / "glue").is_dir():
            return c.resolve()
    looked = ", ".join(str(c) for c in candidates)
    raise DataNotFoundError(f"benchmark data not found (looked in: {looked}); set ZOTUNE_DATA to the data folder")


def read_sst2(split: str = "train", limit: int | None = None, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Rows ``{"sentence": str, "label": int}`` (1 = positive) of GLUE SST-2 ``train`` or ``dev``, in file order."""
    if split not in ("train", "dev"):
        raise ValueError(f"SST-2 split must be 'train' or 'dev', got {split!r}")
    path = find_data_dir(data_dir) / "glue" / "SST-2" / f"{split}.tsv"
    if not path.is_file():
        raise DataNotFoundError(f"missing {path}")
    rows = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            rows.append({"sentence": row["sentence"].strip(), "label": int(row["label"])})
            if limit is not None and len(rows) >= limit:
                break
    return rows
