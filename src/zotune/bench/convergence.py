"""Convergence table and plot of several runs at one forward-pass budget (``benchmarks/convergence.sh``).

For each run directory (made by ``zotune train`` with ``--train.max_forwards``): the method and its lr/ε, steps and
forward passes spent, the mean minibatch training loss over the first and the last ``window`` steps (SVRG's anchor
steps, which report the anchor set's loss, are left out of these means), dev accuracy before and after, and seconds
per step. Writes ``table.md``, ``runs.jsonl`` and ``loss-vs-forwards.png`` (EMA-smoothed loss against forwards).

Example:
    python -m zotune.bench.convergence runs/convergence/* --out benchmarks/results/convergence-smollm2-sst2
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.log import atomic_write_text
from ..train.plot import plot_runs, read_metrics


def summarize(run: str | Path, window: int = 20) -> dict[str, Any]:
    """One row of the table for ``run``."""
    import yaml

    run = Path(run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    method = cfg["method"]
    section = cfg.get(method, {})
    records = read_metrics(run)
    train = [r for r in records if r.get("kind") == "train"]
    mini = [r["loss"] for r in train if not r.get("anchor")]
    evals = [r for r in records if r.get("kind") == "eval" and r.get("split") == "dev"]
    if not train:
        raise ValueError(f"{run}: no training steps in metrics.jsonl")
    return {
        "run": run.name,
        "method": method,
        "lr": section.get("lr"),
        "eps": section.get("eps"),
        "extra": {
            k: section[k] for k in ("rank", "refresh_every", "beta", "anchor_lr", "q", "anchor_size") if k in section
        },
        "steps": train[-1]["step"],
        "forwards": train[-1]["forwards"],
        "loss_first": statistics.fmean(mini[:window]),
        "loss_last": statistics.fmean(mini[-window:]),
        "dev_start": evals[0]["accuracy"] if evals else None,
        "dev_end": evals[-1]["accuracy"] if len(evals) > 1 else None,
        "s_per_step": statistics.median(r["step_time"] for r in train),
    }


def table(rows: Sequence[dict[str, Any]], window: int = 20) -> str:
    head = (
        f"| run | method | lr | other | steps | forwards | loss, first {window} | loss, last {window} | "
        "dev acc. start → end | s/step |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in sorted(rows, key=lambda r: r["loss_last"]):
        other = ", ".join(f"{k} {v}" for k, v in r["extra"].items())
        dev = f"{r['dev_start']:.3f} → {r['dev_end']:.3f}" if r["dev_end"] is not None else "—"
        lines.append(
            f"| {r['run']} | {r['method']} | {r['lr']:g} | {other} | {r['steps']} | {r['forwards']} | "
            f"{r['loss_first']:.4f} | {r['loss_last']:.4f} | {dev} | {r['s_per_step']:.2f} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zotune.bench.convergence", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--window", type=int, default=20, help="steps averaged at the start and the end (default 20)")
    a = p.parse_args(argv)
    rows = [summarize(r, a.window) for r in a.runs]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "runs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    text = table(rows, a.window)
    atomic_write_text(out / "table.md", text)
    plot_runs(a.runs, out / "loss-vs-forwards.png", x="forwards", smooth=0.9, title="SST-2, SmolLM2-135M: same budget")
    print(text, end="")
    print(f"wrote {out}/table.md, runs.jsonl, loss-vs-forwards.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
