"""One cell as a subprocess (``python -m zotune.bench.claims cell CONFIG.yaml``), and the spot-check that reruns a
committed cell's first forwards and compares them with its recorded log."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .results import Results, checkpoint_step, device_type, read_yaml


def run_cell(config: str | Path) -> int:
    """Run (or resume, or leave alone when finished) the cell whose config is ``config``; the exit status.

    Built with :func:`zotune.train.run_config_from_dict` (no jsonargparse). A run folder with a checkpoint resumes
    from it (a parked copy's weights are rebuilt first from its update log by the trainer's resume); one without a
    checkpoint (stopped before its first) starts again; a folder that is not a run folder is refused, untouched.
    0: finished; 3: stopped by the watchdog (its results written); 128 + signal: stopped by SIGINT/SIGTERM
    (resumable from its last checkpoint); 2: a bad config or folder, or a parked copy whose weights do not rebuild."""
    import logging

    import yaml

    from ...train import TrainingStopped, run_config_from_dict, train
    from ...train.checkpoint import CheckpointError
    from ...train.config import ConfigError

    tree = yaml.safe_load(Path(config).read_text())
    out = Path(tree["out"])
    if (out / "results.json").is_file():
        print(f"{out}: finished already (results.json); nothing to do")
        return 0
    if out.exists() and any(out.iterdir()):
        if not (out / "config.yaml").is_file():
            print(f"error: {out} exists and is not a run folder (no config.yaml): move it away", file=sys.stderr)
            return 2
        if checkpoint_step(out) is not None:
            tree["resume"] = True
        else:
            tree["overwrite"] = True  # stopped before its first checkpoint: nothing to resume
    logging.basicConfig(level=logging.INFO, format="[zotune] %(message)s")
    try:
        cfg = run_config_from_dict(tree)
        results = train(cfg, argv=["python", "-m", "zotune.bench.claims", "cell", str(config)])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except CheckpointError as err:  # e.g. a parked copy whose replayed weights do not match their checksums
        print(f"error: {err}; move {out} away to start the cell again", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as err:  # SIGINT, or SIGTERM where the loop turns it into a clean stop
        print(f"stopped: {err or 'interrupted'}; the next run resumes it", file=sys.stderr)
        return int(getattr(err, "exit_code", 130))
    print(f"finished: best dev {results['best_dev']:.4f} (step {results['best_step']}), test {results.get('test')}")
    return 0


def check_cell(
    results_dir: str | Path, cell: str, out: str | Path, *, forwards: int = 20, device: str | None = None
) -> dict[str, Any]:
    """Spot-check that a committed row reproduces from its kept config: rerun ``configs/CELL.yaml`` for its first
    ``forwards`` forwards into ``out`` (no test, no checkpoints) and compare the zero-shot dev accuracy and every
    step's loss with the row's curves (stored to 6 decimals).

    On the row's own device the run is deterministic: every loss must agree to 1e-5 (``ok``). On another device the
    directions come from that device's generator, so only the zero-shot dev (exactly) and the first step's loss are
    judged, the latter to 1e-2: it is the mean of ℓ(θ ± εz), which differs from ℓ(θ) by about ε² zᵀHz / 2 and so
    with the direction (3.7e-3 between a CUDA and a CPU draw of LOZO's first step, 2.2e-3 of MeZO-SVRG's, at
    ε = 1e-3); later steps are reported, not judged. "The same device" includes the instruction set where a
    library picks its kernels by it (bitsandbytes' NF4 on CPUs with and without AVX512: 2.8e-4): a row that logged
    its CPU's instruction set (``cpu_capability``, torch's) is judged strictly only on a CPU with the same one; older
    rows do not say it.

    It also measures the steps' peak memory (``train_peak_mem_mb``; ``peak_mem_mb``: the process's, set-up
    included), which the claims table's memory comparisons use for rows logged before the training phase's peak was,
    and their median time (``median_step_seconds``, the first step left out; the machine's load included), which its
    step-time comparisons prefer to the rows' own when every seed cell of both sides has one on one device type.

    Example: ``python -m zotune.bench.claims check sst2-lozo-m-scan-lr1.25e-05 --forwards 20``
    """
    from ...train import run_config_from_dict, train
    from ...train.plot import read_metrics

    results = Results.load(results_dir)
    if cell not in results.rows:
        raise ValueError(f"{results_dir}: no row {cell!r} in runs.jsonl")
    row, config = results.rows[cell], results.config_path(cell)
    if not config.is_file():
        raise ValueError(f"{config}: the row's config is missing")
    if forwards < 1:
        raise ValueError(f"--forwards {forwards}: must be at least 1")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: the check writes a fresh run there")
    tree = read_yaml(config)
    tree["out"] = str(out)
    big = 10**9
    tree["train"] |= {"max_forwards": forwards, "test": False, "test_at_start": False, "eval_every": big,
                      "checkpoint_every": big, "early_stopping": 0}  # fmt: skip
    ran_on = device or tree["model"].get("device") or "cpu"
    tree["model"]["device"] = ran_on
    train(run_config_from_dict(tree), argv=["python", "-m", "zotune.bench.claims", "check", cell])
    records = read_metrics(out)
    losses = [(r["forwards"], r["loss"]) for r in records if r.get("kind") == "train" and "loss" in r]
    zero_dev = next((r["accuracy"] for r in records if r.get("kind") == "eval" and r.get("split") == "dev"), None)
    peaks = [r["train_peak_mem_mb"] for r in records if r.get("kind") == "train" and "train_peak_mem_mb" in r]
    steps = [r for r in records if r.get("kind") == "train" and "step_time" in r]
    times = sorted(r["step_time"] for r in steps[1:])  # the first step also runs the closure's check forward
    committed = {int(f): v for f, v in row["curves"]["loss"]}
    pairs = [(f, v, committed[f]) for f, v in losses if f in committed]
    if not pairs:
        raise ValueError(f"{cell}: no step of the check matches a logged step of the row (forwards {losses[:3]} ...)")
    import torch

    kind = device_type(ran_on)
    here = torch.backends.cpu.get_cpu_capability() if kind == "cpu" else None
    # a CPU row logged with its instruction set is judged strictly only on a CPU with the same one
    same = device_type(row.get("device", "cpu")) == kind and row.get("cpu_capability") in (None, here)
    judged = pairs if same else pairs[:1]
    tol = 1e-5 if same else 1e-2
    worst = max(abs(a - b) for _, a, b in judged)
    dev_ok = zero_dev is not None and abs(zero_dev - row["zero_shot_dev"]) < 1e-9
    return {
        "cell": cell, "device": ran_on, "row_device": row.get("device"), "same_device": same,
        "cpu_capability": here, "row_cpu_capability": row.get("cpu_capability"),
        "steps_compared": len(pairs), "steps_judged": len(judged), "tolerance": tol, "max_abs_loss_diff": worst,
        "max_abs_loss_diff_all": max(abs(a - b) for _, a, b in pairs), "zero_shot_dev": zero_dev,
        "row_zero_shot_dev": row["zero_shot_dev"], "ok": bool(dev_ok and worst <= tol),
        "train_peak_mem_mb": max(peaks) if peaks else None,
        "median_step_seconds": times[len(times) // 2] if times else None,
        "peak_mem_mb": max((r.get("peak_mem_mb", 0.0) for r in records if r.get("kind") == "train"), default=None),
    }  # fmt: skip
