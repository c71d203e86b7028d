"""Accuracy table of runs made at one forward-pass budget (``benchmarks/peft_table.sh``): per task, zero-shot and
each method's dev-selected test accuracy, with the forwards, backwards and steps it spent.

Example:
    python -m zotune.bench.accuracy runs/peft-table/* --out benchmarks/results/peft-smollm2
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.log import atomic_write_text


def summarize(run: str | Path) -> dict[str, Any]:
    """One row for ``run`` (a finished ``zotune train`` run directory)."""
    import yaml

    run = Path(run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    res = json.loads((run / "results.json").read_text())
    method = cfg["method"]
    section = cfg.get(method, {})
    peft = cfg["model"].get("peft", "none")
    return {
        "run": run.name,
        "task": res["task"],
        "method": method,
        "peft": peft,
        "sparse": {k: cfg["model"].get(k) for k in ("mask", "sparsity", "quantize")} if peft == "sparse" else None,
        "hparams": {k: v for k, v in section.items() if k != "seed"},
        "budget": cfg["train"].get("max_forwards"),
        "steps": res["steps"],
        "forwards": res["forwards"],
        "backwards": res.get("backwards", 0),
        "trainable_parameters": res["trainable_parameters"],
        "zero_shot_test": res.get("zero_shot_test"),
        "zero_shot_dev": res["zero_shot_dev"],
        "best_dev": res["best_dev"],
        "best_step": res["best_step"],
        "test": res.get("test"),
        "test_n": res.get("test_n"),
        "train_seconds": res["train_seconds"],
        **_curves(run / "metrics.jsonl"),
    }


def save_config(run: Path, dest: Path) -> None:
    """The run's ``config.yaml`` as a recipe: the same config, minus how that run was started (``resume``,
    ``overwrite``), so that ``zotune train --config DEST`` makes the same run again in a fresh ``out``."""
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    _write_recipe(cfg, dest, f"# the config of run {run.name}, written by python -m zotune.bench.accuracy\n")


def config_from_command(argv: Sequence[str], dest: Path) -> None:
    """The recipe that ``save_config`` would keep for a ``zotune train ARGV`` run, without running it: for rows whose
    run folder was not kept. Nothing is loaded or trained; a bad ARGV raises the error ``zotune train`` would give.

    Example:
        python -m zotune.bench.accuracy --config-only /tmp/mezo.yaml --config recipes/smollm2-sst2-mezo.yaml
    """
    from ..train.args import parse_train_args
    from ..train.config import config_to_dict

    cfg = config_to_dict(parse_train_args(list(argv)))
    header = "# the config of this row, rebuilt from its command (the run folder was not kept) by --config-only\n"
    _write_recipe(cfg, dest, header)


def _write_recipe(cfg: dict[str, Any], dest: Path, header: str) -> None:
    import yaml

    for key in ("resume", "overwrite", "allow_config_change"):
        cfg.pop(key, None)
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dest, header + yaml.safe_dump(cfg, sort_keys=False))


def _curves(path: Path) -> dict[str, Any]:
    """The run's curves against forward passes, kept in the row so that plots and "forwards to reach a dev accuracy"
    can be made from the committed rows once the run folder is gone: dev and test evaluations, the training loss
    (ZO: the mean of ℓ+ and ℓ−) of every step, the peak memory and the median step time.

    ``dev_seconds`` pairs each dev point with the training seconds spent before it (the sum of the steps'
    ``step_time``; evaluations and checkpoints excluded): ``[[forwards, seconds], ...]``, one per ``dev`` point, for
    the wall-clock to reach a dev accuracy.

    ``peak_mem_mb`` is the process's peak, set-up included (for SensZOQ the Fisher scores of its mask, a backward
    through the fp32 model); ``train_peak_mem_mb`` the training phase's alone (its steps and evaluations; None in
    logs written before it was recorded, and where the peak cannot be reset)."""
    if not path.exists():
        return {}
    dev, dev_seconds, loss, peak, train_peak, times, spent = [], [], [], 0.0, None, [], 0.0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == "eval" and rec.get("split") == "dev":
            dev.append([rec["forwards"], rec.get("accuracy", rec.get("f1"))])
            dev_seconds.append([rec["forwards"], round(spent, 3)])
        elif rec.get("kind") == "train":
            loss.append([rec["forwards"], round(rec["loss"], 6)])
            peak = max(peak, rec.get("peak_mem_mb", 0.0))
            if "train_peak_mem_mb" in rec:
                train_peak = max(train_peak or 0.0, rec["train_peak_mem_mb"])
            times.append(rec.get("step_time", 0.0))
            spent += rec.get("step_time", 0.0)
    times.sort()
    return {
        "curves": {"dev": dev, "loss": loss, "dev_seconds": dev_seconds},
        "peak_mem_mb": peak,
        "train_peak_mem_mb": train_peak,
        "median_step_seconds": times[len(times) // 2] if times else None,
    }


LABELS = {("adamw", "none"): "FO full (AdamW)", ("adamw", "lora"): "FO-LoRA (AdamW)", ("mezo", "none"): "MeZO (full)",
          ("mezo", "lora"): "MeZO-LoRA", ("mezo", "prefix"): "MeZO-prefix", ("lozo", "none"): "LOZO",
          ("lozo_m", "none"): "LOZO-M", ("mezo_svrg", "none"): "MeZO-SVRG", ("mezo", "sparse"): "sparse",
          ("zofo", "lora"): "Bilevel ZOFO"}  # fmt: skip


def row_order(row: dict[str, Any]) -> tuple[int, int, str]:
    """Tasks in the script's order, methods in the table's order (unknown ones last)."""
    tasks = ["sst2", "rte", "cb", "boolq", "sst5", "trec"]
    t = tasks.index(row["task"]) if row["task"] in tasks else len(tasks)
    labels = list(LABELS)
    key = (row["method"], row["peft"])
    return t, labels.index(key) if key in labels else len(labels), row["run"]


def table(rows: Sequence[dict[str, Any]]) -> str:
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        part = [r for r in rows if r["task"] == task]
        # the model at step 0 is the base only for these modes (a prefix or prompt from real tokens changes it)
        base = [r for r in part if r["peft"] in ("none", "lora", "head") and r["zero_shot_test"] is not None]
        zs = base[0]["zero_shot_test"] if base else None
        n = part[0]["test_n"]
        out.append(f"### {task} (test n = {n})\n")
        # "step 0": the test accuracy of the run's own starting model (the 4-bit base, the initial prefix, ...)
        cols = ["method", "test acc.", "step 0", "best dev (step)", "steps", "forwards", "backwards", "trained params"]
        out.append("| " + " | ".join([*cols, "lr etc."]) + " |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        if zs is not None:
            out.append(f"| zero-shot | {zs:.3f} | {zs:.3f} | {base[0]['zero_shot_dev']:.3f} (0) | 0 | 0 | 0 | 0 | — |")
        for r in part:
            label = LABELS.get((r["method"], r["peft"]), f"{r['method']} ({r['peft']})")
            if r.get("sparse"):  # SensZOQ rows: which mask, how many entries, what base
                sp = r["sparse"]
                label = f"{r['method']}-sparse {sp['sparsity']:.2%} {sp['mask']} ({sp['quantize']} base)"
            hp = ", ".join(f"{k} {v}" for k, v in r["hparams"].items() if k not in ("weight_decay",))
            start = "—" if r["zero_shot_test"] is None else f"{r['zero_shot_test']:.3f}"
            out.append(
                f"| {label} | {r['test']:.3f} | {start} | {r['best_dev']:.3f} ({r['best_step']}) | {r['steps']} | "
                f"{r['forwards']} | {r['backwards']} | {r['trainable_parameters']:,} | {hp} |"
            )
        out.append("")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--config-only"]:  # --config-only DEST ZOTUNE_TRAIN_ARGS...: the row's recipe, no run
        if len(argv) < 3:
            print("usage: python -m zotune.bench.accuracy --config-only DEST ZOTUNE_TRAIN_ARGS...", file=sys.stderr)
            return 2
        from ..train.config import ConfigError

        try:
            config_from_command(argv[2:], Path(argv[1]))
        except ConfigError as err:
            print(f"python -m zotune.bench.accuracy --config-only: error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {argv[1]}")
        return 0
    p = argparse.ArgumentParser(
        prog="python -m zotune.bench.accuracy",
        description=__doc__.split("\n\n")[0],
        epilog="--config-only DEST ZOTUNE_TRAIN_ARGS... (first): write the recipe a `zotune train` run with these "
        "arguments would keep, without running it (rows whose run folder is gone).",
    )
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", required=True, help="folder for table.md and runs.jsonl")
    p.add_argument(
        "--merge", action="store_true", help="keep the rows already in OUT/runs.jsonl of runs not given here"
    )
    a = p.parse_args(argv)
    finished = [Path(r) for r in a.runs if (Path(r) / "results.json").exists()]
    rows = [summarize(r) for r in finished]
    out = Path(a.out)
    if a.merge and (out / "runs.jsonl").exists():
        # runs are deterministic, so a row made earlier (its run folder since deleted) stands for its run
        new = {r["run"] for r in rows}
        old = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines() if line.strip()]
        rows = [r for r in old if r["run"] not in new] + rows
    if not rows:
        p.error("no finished run (results.json) among the given folders")
    rows.sort(key=row_order)
    out.mkdir(parents=True, exist_ok=True)
    for r in finished:  # each row's full config, runnable as is: zotune train --config OUT/configs/RUN.yaml
        save_config(r, out / "configs" / f"{r.name}.yaml")
    atomic_write_text(out / "runs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(out / "table.md", table(rows) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
