"""Sample efficiency at fine resolution: how many forwards a packed row needs to reach MeZO's dev accuracy."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ...core.log import atomic_write_text
from .protocol import Cell, Protocol, cell_tree, grid
from .results import Results, picks, prune_run, seed_rows


def reach_cells(protocol: Protocol, results: Results, rows: Sequence[str] | None = None) -> list[tuple[Cell, float]]:
    """The seed cells of the reach rows on the reach task, each with its picked lr (rows without a pick left out)."""
    chosen = picks(protocol, results)
    wanted = protocol.reach_rows if rows is None else tuple(rows)
    for name in wanted:
        protocol.row(name)  # KeyError naming the rows for an unknown one
    out = []
    for cell in grid(protocol):
        if cell.phase == "seeds" and cell.task == protocol.reach_task and cell.row.name in wanted:
            lr = chosen.get((cell.task, cell.row.name), {}).get("lr")
            if lr is not None:
                out.append((cell, lr))
    return out


def reach_name(cell: Cell, protocol: Protocol) -> str:
    return f"{cell.name}-first{protocol.reach_forwards}"


def reach_tree(
    cell: Cell, protocol: Protocol, *, out: Path, device: str, lr: float, model: str | None = None
) -> dict[str, Any]:
    """The seed cell's config cut to its first ``reach_forwards`` forwards with dev every ``reach_every`` forwards
    (no test, no checkpoints): the same run as the grid's seed cell up to there (the same seed, batches and
    directions; evaluating does not move the run), seen more often."""
    tree = cell_tree(cell, protocol, out=out, device=device, lr=lr, model=model)
    every = max(1, round(protocol.reach_every / (cell.row.fwd_per_step * cell.row.rows)))
    budget = protocol.reach_forwards // cell.row.rows  # steps: a bound (a step is at least one forward)
    tree["train"] |= {"steps": budget, "max_forwards": budget, "eval_every": every, "checkpoint_every": budget + 1,
                      "test": False, "test_at_start": False}  # fmt: skip
    tree["out"] = str(out / reach_name(cell, protocol))
    return tree


def run_reach(
    protocol: Protocol,
    results_dir: str | Path,
    out: str | Path,
    *,
    rows: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    device: str = "cpu",
    model: str | None = None,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Run the reach rows' seed cells for their first ``reach_forwards`` forwards with dev every ``reach_every``
    (:func:`reach_tree`), one after another in this process, and record each in ``RESULTS/reach.jsonl`` (its
    config in ``RESULTS/configs/reach/``). A run recorded at its row's current pick is skipped; an unfinished run
    folder starts again (no checkpoints in between), and a recorded run keeps no weights. Returns the runs recorded.

    Example: ``python -m zotune.bench.claims reach --rows fzoo --seeds 0``"""
    from ...train import run_config_from_dict, train
    from ...train.plot import read_metrics
    from ..accuracy import save_config

    results, out = Results.load(results_dir), Path(out) / "reach"
    done = []
    for cell, lr in reach_cells(protocol, results, rows):
        if seeds is not None and cell.seed not in seeds:
            continue
        name = reach_name(cell, protocol)
        old = results.reach.get(name)
        if old is not None and math.isclose(old["lr"], lr, rel_tol=1e-9):
            log(f"{name}: recorded at lr {lr:g}, skipped")
            continue
        tree = reach_tree(cell, protocol, out=out, device=device, lr=lr, model=model)
        run = Path(tree["out"])
        if not (run / "results.json").is_file():
            if run.exists():
                shutil.rmtree(run)
            log(f"{name}: {protocol.reach_forwards} forwards at lr {lr:g}, dev every {tree['train']['eval_every']} "
                "steps")  # fmt: skip
            train(run_config_from_dict(tree), argv=["python", "-m", "zotune.bench.claims", "reach", name])
        records = read_metrics(run)
        env = json.loads((run / "env.json").read_text()) if (run / "env.json").is_file() else {}
        res = json.loads((run / "results.json").read_text())
        losses = {r["forwards"]: r["loss"] for r in records if r.get("kind") == "train" and "loss" in r}
        row = {
            "run": name, "cell": cell.name, "task": cell.task, "row": cell.row.name, "seed": cell.seed, "lr": lr,
            "forwards": res["forwards"] * cell.row.rows, "seconds": res.get("seconds"),
            "device": env.get("device") or device,
            "dev": [[r["forwards"] * cell.row.rows, r["accuracy"]] for r in records
                    if r.get("kind") == "eval" and r.get("split") == "dev"],
            "loss": sorted([f, v] for f, v in losses.items()),
        }  # fmt: skip
        seed_row = results.rows.get(cell.name)  # the grid's run of the same cell: the same losses up to here
        if (seed_row is not None and seed_row.get("device") == row["device"]
                and math.isclose(seed_row.get("lr") or 0.0, lr, rel_tol=1e-9)):  # fmt: skip
            logged = {int(f): v for f, v in seed_row["curves"]["loss"]}
            common = [abs(v - logged[f]) for f, v in losses.items() if f in logged]
            row["grid_loss_diff"] = max(common) if common else None
        save_config(run, results.folder / "configs" / "reach" / f"{name}.yaml")
        results = Results.load(results_dir)  # another process may have added rows since
        results.reach[name] = row
        text = "".join(json.dumps(r) + "\n" for _, r in sorted(results.reach.items()))
        atomic_write_text(results.folder / "reach.jsonl", text)
        prune_run(run, "all")  # recorded: its weights (the final checkpoint and the best) are not needed again
        done.append(name)
        log(f"{name}: dev {' '.join(f'{f}:{a:.3f}' for f, a in row['dev'])}")
    return done


def mezo_dev_at(protocol: Protocol, results: Results, seed: int) -> tuple[int, float] | None:
    """MeZO's last dev evaluation at or before ``reach_target`` forwards (+ 1: the first step's check forward) on
    the reach task's seed run: (forwards, accuracy)."""
    row = seed_rows(protocol, results, protocol.reach_task, "mezo").get(seed)
    points = [(f, a) for f, a in (row or {}).get("curves", {}).get("dev", []) if 0 < f <= protocol.reach_target + 1]
    return max(points) if points else None


def reach_interval(points: Sequence[Sequence[float]], target: float) -> tuple[int, float]:
    """Where dev first reaches ``target`` along ``points`` ([forwards, accuracy], any order): (lo, hi) with the
    reach in (lo, hi]: hi the first evaluation at or above it, lo the one before; (last, inf) when never.

    >>> reach_interval([[0, 0.5], [25, 0.6], [50, 0.7], [75, 0.65]], 0.68)
    (25, 50)
    """
    lo = 0
    for f, acc in sorted(points):
        if acc >= target - 1e-12:
            return lo, f
        lo = f
    return lo, math.inf


def reach_summary(
    protocol: Protocol, results: Results, row: str, chosen: dict[tuple[str, str], dict[str, Any]] | None = None
) -> dict[str, Any] | None:
    """The row's reach of MeZO's 200-step dev, per seed and on average, and the verdict against a quarter of MeZO's
    forwards. Per seed the fine-resolution run's dev points (its first ``reach_forwards``) are followed by the
    grid's seed run's later ones, where that run exists at the same lr. The mean reach lies in (mean lo, mean hi]:
    *holds* when mean hi ≤ target ÷ 4, *does not hold at this scale* when mean lo ≥ target ÷ 4, else
    *inconclusive (between two evaluations)*. Where the seed run is not done yet, seed 0 takes the lr scan's run at
    the pick instead: the same run (same seed, constant lr) for its first ``scan_budget`` forwards. None when the
    row has no reach run; ``missing`` names what is."""
    pick = (picks(protocol, results) if chosen is None else chosen).get((protocol.reach_task, row), {})
    chosen_lr = pick.get("lr")
    runs = {r["seed"]: r for r in results.reach.values() if r["row"] == row and r["task"] == protocol.reach_task}
    if not runs:
        return None
    grid_rows = seed_rows(protocol, results, protocol.reach_task, row)
    per, missing = {}, []
    for s in protocol.seeds:
        run, target = runs.get(s), mezo_dev_at(protocol, results, s)
        if run is None or chosen_lr is None or not math.isclose(run["lr"], chosen_lr, rel_tol=1e-9):
            missing.append(f"s{s}: no run at the pick" if run is None else f"s{s}: ran at {run['lr']:g}, pick now "
                           f"{chosen_lr if chosen_lr is None else format(chosen_lr, 'g')}")  # fmt: skip
            continue
        if target is None:
            missing.append(f"s{s}: MeZO's seed run")
            continue
        points = list(run["dev"])
        later = grid_rows.get(s)
        if later is not None and not math.isclose(later.get("lr") or 0.0, run["lr"], rel_tol=1e-9):
            later = None  # the seed run at another lr is another run
        if later is None and s == protocol.scan_seed:  # the scan at the pick: the seed run's first scan_budget
            scan = Cell(protocol.reach_task, protocol.row(row), "scan", s, run["lr"] / protocol.row(row).hparams[
                protocol.row(row).scale[0]])  # fmt: skip
            later = results.rows.get(scan.name)
        if later is not None:
            k = later.get("rows_per_forward", 1)
            points += [[f * k, a] for f, a in later.get("curves", {}).get("dev", []) if f * k > run["forwards"]]
        lo, hi = reach_interval(points, target[1])
        if lo >= run["forwards"]:  # not reached by the fine run, which stopped where its next step would pass the
            lo = max(lo, protocol.reach_forwards)  # budget: no state up to the budget reached it
        per[s] = {"target": target, "interval": (lo, hi)}
    out: dict[str, Any] = {"row": row, "lr": chosen_lr, "seeds": per}
    if missing:
        out["missing"] = missing
        return out
    lo = statistics.fmean(v["interval"][0] for v in per.values())
    hi = statistics.fmean(v["interval"][1] for v in per.values())
    quarter = protocol.reach_target / 4
    out |= {"mean": (lo, hi), "quarter": quarter}
    out["verdict"] = ("holds" if hi <= quarter else "does not hold at this scale" if lo >= quarter
                      else "inconclusive (between two evaluations)")  # fmt: skip
    return out


def reach_lines(protocol: Protocol, results: Results, href: str = "reach.jsonl") -> list[str]:
    chosen = picks(protocol, results)
    sums = [x for r in protocol.rows if (x := reach_summary(protocol, results, r.name, chosen)) is not None]
    if not sums:
        return []
    q = protocol.reach_target // 4
    lines = [
        f"Sample efficiency at fine resolution: forwards each packed estimator needs to reach MeZO's dev accuracy "
        f"after {protocol.reach_target // 2} steps ({protocol.reach_target} forwards), same seed; the target is "
        f"≤ {q} (a quarter). Dev every {protocol.reach_every} forwards over the first {protocol.reach_forwards} "
        f"([reach.jsonl]({href}): the seed run's first forwards, rerun), then the grid's seed run's (every "
        f"{protocol.eval_forwards}); a reach in (a, b] lies between two evaluations:",
        "",
        "| method | lr | MeZO's dev per seed | forwards to reach it, per seed | mean | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for x in sums:
        label = protocol.row(x["row"]).label
        mezo = " / ".join(f"{v['target'][1]:.3f}" for v in x["seeds"].values()) or "—"

        def span(iv: tuple[float, float]) -> str:
            if iv[1] == 0:
                return "0 (before training)"
            return f"({iv[0]:.0f}, {iv[1]:.0f}]" if math.isfinite(iv[1]) else f"> {iv[0]:.0f}"

        per = " / ".join(f"s{s} {span(v['interval'])}" for s, v in x["seeds"].items())
        if "missing" in x:
            lines.append(f"| {label} | {x['lr'] or '—'} | {mezo} | {per or '—'} | — | missing: "
                         f"{'; '.join(x['missing'])} |")  # fmt: skip
            continue
        lines.append(f"| {label} | {x['lr']:g} | {mezo} | {per} | {span(x['mean'])} | **{x['verdict']}** |")
    return lines + [""]
