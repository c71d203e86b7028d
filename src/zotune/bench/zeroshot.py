"""Zero-shot and in-context baselines of a model on every task that has data, as a committed table.

Each task's test set comes from :func:`zotune.tasks.mezo_splits` (seed 0; its protocol string is recorded), the ICL
demonstrations from its training split. Raw and calibrated accuracy are reported for classification tasks.
One JSON line per (task, setting) is appended to ``--out`` as it is measured, so an interrupted run keeps what it did.

Example (the committed table comes from this command):
    python -m zotune.bench.zeroshot --tasks sst2 rte cb boolq wsc wic multirc copa sst5 trec --limit 500 \\
        --icl 4 --out benchmarks/results/zeroshot-smollm2.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def run(model_name: str, tasks: list[str], *, limit: int | None, icl: int, batch_size: int, out: Path | None) -> list:
    from ..models import load
    from ..tasks import evaluate, get_task, mezo_splits

    model, tok = load(model_name)
    rows: list[dict[str, Any]] = []
    for name in tasks:
        task = get_task(name)
        try:
            splits = mezo_splits(task, seed=0)
        except (ValueError, FileNotFoundError) as e:
            print(f"{name}: skipped ({e})", flush=True)
            continue
        test = splits["test"][:limit] if limit else splits["test"]
        settings: list[tuple[str, dict[str, Any]]] = [("zero-shot", {})]
        if task.kind == "classification":
            settings.append(
                ("zero-shot calibrated", {"calibrated": True, "calibration_prompt": task.calibration_prompt})
            )
        if icl:
            settings.append((f"ICL k={icl}", {"demos": splits["train"], "k": icl, "seed": 0}))
        for label, kw in settings:
            t0 = time.perf_counter()
            res = evaluate(model, tok, test, batch_size=batch_size, **kw)
            row = {
                "model": model_name,
                "task": name,
                "setting": label,
                "n": len(test),
                "protocol": splits.protocol,
                **{k: v for k, v in res.items() if isinstance(v, (int, float, str))},
                "wall_s": round(time.perf_counter() - t0, 1),
            }
            rows.append(row)
            metric = row.get("accuracy", row.get("f1"))
            print(f"{name:8} {label:22} n={len(test):5d}  {metric:.4f}  ({row['wall_s']} s)", flush=True)
            if out:
                out.parent.mkdir(parents=True, exist_ok=True)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zotune.bench.zeroshot", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", nargs="+", default=["sst2", "rte"])
    p.add_argument("--limit", type=int, default=None, help="score at most this many test examples per task")
    p.add_argument("--icl", type=int, default=0, help="also evaluate with k demonstrations (0: skip)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    a = p.parse_args(argv)
    run(a.model, a.tasks, limit=a.limit, icl=a.icl, batch_size=a.batch_size, out=a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
