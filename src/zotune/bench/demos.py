"""Which demonstrations to put in context: candidate sets scored on dev before fine-tuning, the best one picked.

With ``data.demos`` K demonstrations leave train and start every prompt (LM-BFF's fine-tuning with demonstrations, Gao
et al., ACL 2021). In-context accuracy depends on which K are drawn (Zhao et al., ICML 2021, "Calibrate before use"):
on SST-2 (main-job protocol) eight draws of 4 gave SmolLM2-135M dev accuracies from 0.535 to 0.675. This scores the
run's own dev split (the config's data section, its model) with the demonstrations of ``--candidates`` draws,
``data.demos_seed`` = first, first + 1, ..., and picks the best on dev (ties: the smaller seed). The test split is
never read unless ``--test`` asks for it, and it never takes part in the pick. Set the pick as ``data.demos_seed`` in
the run's config.

Example:
    python -m zotune.bench.demos --config benchmarks/results/moonshot-demos-picked-smollm2/config.yaml \\
        --candidates 8 --out benchmarks/results/moonshot-demos-picked-smollm2/demos.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from .speed import machine


def pick(
    model: Any, tokenizer: Any, data: Any, task: Any, seeds: list[int], *, batch_size: int = 16, test: bool = False
) -> dict[str, Any]:
    """Dev accuracy (and test, with ``test``) of the run's prompts with each seed's demonstrations, and the pick.

    ``data`` is a :class:`~zotune.train.config.DataConfig` with ``demos`` > 0; ``seeds`` the candidate
    ``demos_seed`` values. Returns ``{"candidates": [{"demos_seed", "dev", "test"?, "demonstrations", "seconds"}],
    "pick", "pick_dev", "seconds"}``; the pick is the highest dev accuracy, the smaller seed on ties.
    """
    from ..tasks import evaluate
    from ..tasks.icl import with_demos
    from ..train.data import build_splits

    if not data.demos:
        raise ValueError("data.demos is 0: there are no demonstrations to pick; set data.demos to K > 0")
    if not seeds:
        raise ValueError("no candidate seeds to score")
    start = time.perf_counter()
    plain = build_splits(replace(data, demos=0, demos_seed=None), task)  # the run's splits before any are taken
    query = plain["dev"][0].prompt
    rows = []
    for s in seeds:
        t0 = time.perf_counter()
        splits = with_demos(plain, data.demos, s)  # as build_splits draws them with data.demos_seed = s
        dev = evaluate(model, tokenizer, splits["dev"], batch_size=batch_size, max_length=data.max_length)
        row: dict[str, Any] = {"demos_seed": s, "dev": dev["accuracy"], "dev_n": dev["n"]}
        if test:
            res = evaluate(model, tokenizer, splits["test"], batch_size=batch_size, max_length=data.max_length)
            row["test"], row["test_n"] = res["accuracy"], res["n"]
        row["demonstrations"] = splits["dev"][0].prompt[: -len(query)]
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        extra = f", test {row['test']:.4f}" if test else ""
        print(f"demos_seed {s:3d}: dev {row['dev']:.4f}{extra} ({row['seconds']:.0f} s)", flush=True)
    best = max(rows, key=lambda r: (r["dev"], -r["demos_seed"]))
    return {
        "candidates": rows,
        "pick": best["demos_seed"],
        "pick_dev": best["dev"],
        "seconds": round(time.perf_counter() - start, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zotune.bench.demos", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, required=True, help="a zotune train config with data.demos > 0")
    p.add_argument("--candidates", type=int, default=8, help="demonstration draws to score (default 8)")
    p.add_argument("--first", type=int, default=None, help="first demos_seed (default: the config's data seed)")
    p.add_argument("--test", action="store_true", help="also score test per candidate (never used to pick)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, default=None, help="write the scores and the pick here (JSON)")
    a = p.parse_args(argv)
    if a.candidates < 1:
        p.error(f"--candidates {a.candidates}: score at least one draw")
    if a.first is not None and a.first < 0:
        p.error(f"--first {a.first}: seeds are >= 0")
    if not a.config.is_file():
        p.error(f"--config {a.config}: no such file")

    import yaml

    from ..models import load
    from ..train.config import ConfigError, run_config_from_dict
    from ..train.data import resolve_task
    from ..train.setup import _device

    try:
        cfg = run_config_from_dict(yaml.safe_load(a.config.read_text()) or {})
    except ConfigError as err:
        p.error(f"--config {a.config}: {err}")
    if not cfg.data.demos:
        p.error(f"--config {a.config}: data.demos is 0; set the number of demonstrations to pick from")
    first = cfg.data.seed if a.first is None else a.first
    task = resolve_task(cfg.data.task)
    device = _device(cfg.model.device)  # where the run would train
    model, tok = load(cfg.model.name, dtype=cfg.model.dtype, device=device)
    res = pick(
        model, tok, cfg.data, task, list(range(first, first + a.candidates)), batch_size=a.batch_size, test=a.test
    )
    res = {
        "config": str(a.config),
        "model": cfg.model.name,
        "task": task.name,
        "demos": cfg.data.demos,
        **machine(device),
        **res,
        "command": ["python", "-m", "zotune.bench.demos", *(sys.argv[1:] if argv is None else argv)],
    }
    print(
        f"pick: data.demos_seed {res['pick']} (dev {res['pick_dev']:.4f}; {res['seconds']:.0f} s for "
        f"{a.candidates} draws)"
    )
    if a.out:
        from ..core.log import atomic_write_text

        atomic_write_text(a.out, json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
