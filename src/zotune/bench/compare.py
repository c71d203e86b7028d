"""Regeneration check: are a fresh run's figures within a tolerance of the committed ones?

Every figure on the results page comes from a committed file made by a committed command. Rerun that command into
another place and compare the two files with this module:

* two accuracy folders (``runs.jsonl`` of :mod:`zotune.bench.accuracy`): per (task, run) present in both, the
  test accuracy, the best dev accuracy and its step's forwards, the zero-shot accuracies;
* two benchmark JSONs (:mod:`zotune.bench` and friends): every entry of ``ratios`` (timings are compared as ratios
  measured in one process, never as seconds, since the machines are shared and noisy).

A figure passes when ``|fresh - committed| <= tol * |committed|``. Rows or ratios present on one side only are listed
as not compared; they fail the check only with ``--strict``.

Example::

    TASKS=sst2 ONLY=mezo OUT=/tmp/regen/runs RESULTS=/tmp/regen/peft bash benchmarks/peft_table.sh
    python -m zotune.bench.compare benchmarks/results/peft-smollm2 /tmp/regen/peft --tol 0.1
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report import load_rows

ROW_FIGURES = ("test", "best_dev", "zero_shot_test", "zero_shot_dev")


def figures(path: str | Path) -> dict[str, float]:
    """The comparable figures of one results file or folder, by name (``task/run:figure`` or ``ratio``)."""
    path = Path(path)
    if path.is_dir():
        return {
            f"{row['task']}/{row['run']}:{key}": float(row[key])
            for row in load_rows([path])
            for key in ROW_FIGURES
            if row.get(key) is not None
        }
    if not path.is_file():
        raise FileNotFoundError(f"{path}: neither a results folder (runs.jsonl) nor a benchmark JSON")
    ratios = json.loads(path.read_text()).get("ratios")
    if not ratios:
        raise ValueError(f"{path} has no 'ratios' to compare (a benchmark JSON of python -m zotune.bench has)")
    return {k: float(v) for k, v in ratios.items()}


def compare(committed: str | Path, fresh: str | Path, tol: float = 0.1) -> list[dict[str, Any]]:
    """One entry per figure name on either side: committed, fresh, relative difference, ok (None: one side only)."""
    if not 0 <= tol < 1:
        raise ValueError(f"tol must be in [0, 1), got {tol}")
    old, new = figures(committed), figures(fresh)
    if Path(committed).is_dir() != Path(fresh).is_dir():
        raise ValueError("compare a results folder with a results folder, or a benchmark JSON with a benchmark JSON")
    out = []
    for name in sorted(old.keys() | new.keys()):
        a, b = old.get(name), new.get(name)
        if a is None or b is None:
            out.append({"figure": name, "committed": a, "fresh": b, "rel": None, "ok": None})
            continue
        rel = abs(b - a) / abs(a) if a else (0.0 if b == a else math.inf)
        out.append({"figure": name, "committed": a, "fresh": b, "rel": rel, "ok": rel <= tol})
    return out


def format_table(entries: Sequence[dict[str, Any]], tol: float) -> str:
    lines = ["| figure | committed | fresh | rel. diff | within tol |", "|---|---|---|---|---|"]
    for e in entries:
        fmt = lambda v: "—" if v is None else f"{v:.4g}"  # noqa: E731
        verdict = "not compared" if e["ok"] is None else ("yes" if e["ok"] else "**NO**")
        rel = "—" if e["rel"] is None else f"{e['rel']:.1%}"
        lines.append(f"| {e['figure']} | {fmt(e['committed'])} | {fmt(e['fresh'])} | {rel} | {verdict} |")
    both = [e for e in entries if e["ok"] is not None]
    worst = max((e["rel"] for e in both), default=0.0)
    lines += ["", f"{sum(e['ok'] for e in both)} of {len(both)} compared figures within {tol:.0%} "
              f"(largest difference {worst:.1%}); {len(entries) - len(both)} on one side only"]  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zotune.bench.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("committed", help="the committed results folder or benchmark JSON")
    p.add_argument("fresh", help="the same command's output, rerun")
    p.add_argument("--tol", type=float, default=0.1, help="relative tolerance (default 0.1: within 10 %%)")
    p.add_argument("--strict", action="store_true", help="also fail on figures present on one side only")
    a = p.parse_args(argv)
    try:
        entries = compare(a.committed, a.fresh, a.tol)
    except (OSError, ValueError) as e:
        p.error(str(e))
    print(format_table(entries, a.tol))
    bad = [e for e in entries if e["ok"] is False or (a.strict and e["ok"] is None)]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
