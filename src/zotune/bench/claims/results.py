"""What the grid has produced: finished rows, lr picks (with the stability rule), cell statuses, and the
summaries that turn a finished run folder into a row."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...core.log import atomic_write_text
from .protocol import Cell, Protocol, Row, budget_of, cell_tree, grid, protocol_diff, resolved


@dataclass
class Results:
    """``RESULTS/runs.jsonl`` (one row per finished cell), ``RESULTS/configs/``, ``RESULTS/lr/`` and the spot-checks
    (``RESULTS/checks.jsonl``)."""

    folder: Path
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    superseded: list[dict[str, Any]] = field(default_factory=list)  # seed rows set aside by the stability rule
    reach: dict[str, dict[str, Any]] = field(default_factory=dict)  # RESULTS/reach.jsonl, by run name
    checks: list[dict[str, Any]] = field(default_factory=list)  # RESULTS/checks.jsonl, oldest first

    @classmethod
    def load(cls, folder: str | Path) -> Results:
        folder = Path(folder)
        rows = {row.get("cell") or row["run"]: row for row in _read_jsonl(folder / "runs.jsonl")}
        reach = {row["run"]: row for row in _read_jsonl(folder / "reach.jsonl")}
        return cls(folder, rows, _read_jsonl(folder / "superseded.jsonl"), reach, _read_jsonl(folder / "checks.jsonl"))

    def config_path(self, cell: str) -> Path:
        return self.folder / "configs" / f"{cell}.yaml"

    def parked_path(self, cell: str) -> Path:
        """Where an unfinished cell is kept between machines: its run folder without the weights its update log
        rebuilds (:func:`zotune.train.portable.light_copy`)."""
        return self.folder / "parked" / cell

    def superseded_config_path(self, row: dict[str, Any]) -> Path:
        return self.folder / "configs" / "superseded" / f"{row['cell']}-lr{row['lr']:g}.yaml"

    def set_aside(self, names: Sequence[str], order: Sequence[str]) -> None:
        """Write the rows ``names`` (added to ``superseded`` already) out of ``runs.jsonl``: ``superseded.jsonl``
        first, so that a crash in between leaves a row in both files, never in neither."""
        text = "".join(json.dumps(r) + "\n" for r in self.superseded)
        atomic_write_text(self.folder / "superseded.jsonl", text)
        for name in names:
            self.rows.pop(name, None)
        self.save(order, drop=names)

    def save(self, order: Sequence[str], drop: Sequence[str] = ()) -> None:
        """Write ``runs.jsonl``, keeping the rows another process added to it since this one was loaded (a
        ``summarize`` or ``unpack`` beside a running driver); a row held here wins over the file's. ``drop``: rows
        removed on purpose (set aside), not taken back from the file."""
        for name, row in Results.load(self.folder).rows.items():
            if name not in drop:
                self.rows.setdefault(name, row)
        rank = {name: i for i, name in enumerate(order)}
        rows = sorted(self.rows.values(), key=lambda r: (rank.get(r["cell"], len(rank)), r["cell"]))
        atomic_write_text(self.folder / "runs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {n}: not JSON ({err.msg})") from None
    return rows


LOSS_ROSE = 1.25  # a seed run whose training loss ends this many times above where it began counts as unstable


def loss_rise(row: dict[str, Any]) -> float | None:
    """The mean training loss over a run's last tenth of logged steps ÷ the mean over its first tenth (None without
    a loss curve of 10 points). Every stable ZO seed run of the grid ends at 0.47-0.85 × its start; a constant step
    too long for the budget (FZOO's normalized step) makes the loss drift up without ever tripping the watchdog's
    10 × rule."""
    losses = [v for _, v in (row.get("curves") or {}).get("loss") or ()]
    if len(losses) < 10:
        return None
    k = len(losses) // 10
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return last / first if first > 0 else None


def instability(row: dict[str, Any]) -> str:
    """Why the stability rule counts a seed row as diverged: stopped by the watchdog, or a training loss that rose
    (:func:`loss_rise` above :data:`LOSS_ROSE`); "" when it does not."""
    if str(row.get("stopped") or "").startswith("watchdog"):
        return "stopped by the watchdog"
    rise = loss_rise(row)
    if rise is not None and rise > LOSS_ROSE:
        return f"training loss rose × {rise:.2f} from its first tenth of steps to its last"
    return ""


def _diverged(row: dict[str, Any]) -> bool:
    return bool(instability(row))


def unstable_lrs(results: Results, task: str, row: str) -> list[float]:
    """The lrs at which a seed run of (task, row), kept or set aside, diverged: stopped by the watchdog or its
    training loss rose (:func:`instability`; the stability rule)."""
    found = [*results.rows.values(), *results.superseded]
    return sorted({r["lr"] for r in found if r.get("task") == task and r.get("row") == row
                   and r.get("phase") == "seeds" and r.get("lr") is not None and _diverged(r)})  # fmt: skip


def _at_or_above(lr: float, ceiling: float) -> bool:
    return lr >= ceiling * (1 - 1e-9)  # lrs are products of floats: a relative tolerance


def pick_lr(protocol: Protocol, results: Results, task: str, row: Row) -> dict[str, Any] | None:
    """The lr scan's pick for (task, row) once every scan cell has a row: the best best-dev accuracy, ties to the
    smaller lr. None while the scan is unfinished. The record says whether the pick lies on the grid's edge (the
    best lr may then lie outside the grid) and whether any lr beat the zero-shot dev accuracy.

    Stability rule: the lrs at or above one where a seed run diverged (:func:`unstable_lrs`; the 500-forward scan
    is too short to show a divergence that 2,000 forwards do) are left out of the pick and listed
    under ``unstable``; ``lr`` is None when no lr of the scan is left."""
    scan = [c for c in grid(protocol) if c.task == task and c.row.name == row.name and c.phase == "scan"]
    found = [results.rows.get(c.name) for c in scan]
    if not scan or any(r is None for r in found):
        return None
    points = sorted(({"lr": c.scan_lr, "factor": c.factor, "cell": c.name, "best_dev": r["best_dev"],
                      "best_step": r["best_step"], "test": r.get("test")} for c, r in zip(scan, found, strict=True)),
                    key=lambda p: p["lr"])  # fmt: skip
    unstable = unstable_lrs(results, task, row.name)
    stable = [p for p in points if not unstable or not _at_or_above(p["lr"], unstable[0])]
    best = max(stable, key=lambda p: (p["best_dev"], -p["lr"])) if stable else None
    zero_shot = found[0].get("zero_shot_dev")
    pick = {
        "task": task,
        "row": row.name,
        "key": row.scale[0],
        "lr": best and best["lr"],
        "rule": "highest best dev accuracy of the scan (seed 0); ties go to the smaller lr",
        "scan_budget": protocol.scan_budget,
        "grid": points,
        "edge": best is not None and (best is points[0] or best is points[-1]),
        "zero_shot_dev": zero_shot,
        "beats_zero_shot": best is not None and (zero_shot is None or best["best_dev"] > zero_shot),
    }
    if unstable:
        pick["rule"] += (f"; stability rule: lrs from {unstable[0]:.3g} up are left out (a seed run diverged there: "
                         "stopped by the watchdog, or its training loss rose)")  # fmt: skip
        pick["unstable"] = unstable
    return pick


def picks(protocol: Protocol, results: Results) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for task in protocol.tasks:
        for row in protocol.rows:
            if row.scanned and (p := pick_lr(protocol, results, task, row)) is not None:
                out[(task, row.name)] = p
    return out


@dataclass
class Status:
    """A cell's state: done, unfinished, missing, waiting (its lr scan is not finished), conflict (a folder or row
    that does not follow the protocol: named, never overwritten) or unavailable (a module it needs is missing)."""

    cell: Cell
    state: str
    detail: str = ""
    resume_step: int | None = None
    forwards_done: int = 0


def checkpoint_step(run: Path) -> int | None:
    from ...train import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(run)
    if latest is None:
        return None
    m = re.search(r"(\d+)$", latest.name)
    return int(m.group(1)) if m else None


def _forwards_at(run: Path, step: int) -> int:
    done = 0
    path = run / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line)
                if rec.get("kind") == "train" and rec.get("step", 0) <= step:
                    done = max(done, rec.get("forwards", 0))
    return done


_EXPECTED: dict[tuple[int, str, float | None], dict[str, Any]] = {}
_YAML: dict[tuple[str, int, int], dict[str, Any]] = {}


def expected_config(cell: Cell, protocol: Protocol, lr: float | None) -> dict[str, Any]:
    """The resolved config the protocol gives ``cell`` (memoized: the driver asks for it at every change)."""
    key = (id(protocol), cell.name, lr)
    if key not in _EXPECTED:
        _EXPECTED[key] = resolved(cell_tree(cell, protocol, out=Path("."), device="cpu", lr=lr))
    return _EXPECTED[key]


def read_yaml(path: Path) -> dict[str, Any]:
    """A config file's contents (memoized by path, size and modification time)."""
    import yaml

    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _YAML:
        _YAML[key] = yaml.safe_load(path.read_text())
    return _YAML[key]


_RESUME_SETS = ("train.steps ", "train.max_forwards ")  # a resumed run takes the protocol's values of these


def check_cell_config(
    cell: Cell, protocol: Protocol, found: dict[str, Any], lr: float | None, unfinished: bool = False
) -> list[str]:
    """The differences of a cell's config from the protocol (empty: it follows it). An ``unfinished`` run may differ
    in its step and forward budgets: resuming it sets them to the protocol's (zotune allows both to change)."""
    if cell.phase == "seeds" and lr is None:
        return ["its lr scan is not finished, so no lr is picked to check it against"]
    diff = protocol_diff(found, expected_config(cell, protocol, lr), protocol)
    return [d for d in diff if not d.startswith(_RESUME_SETS)] if unfinished else diff


def statuses(
    protocol: Protocol, out: Path, results: Results, profile: str | None = None
) -> tuple[list[Status], dict[tuple[str, str], dict[str, Any]]]:
    """Every cell's status (read-only: nothing is written) and the lr picks made so far."""
    chosen = picks(protocol, results)
    found_missing = {m: importlib.util.find_spec(m) is None for r in protocol.rows for m in r.needs}
    out_list = []
    for cell in grid(protocol, profile):
        lr = chosen.get((cell.task, cell.row.name), {}).get("lr") if cell.phase == "seeds" else None
        run = out / cell.name
        row = results.rows.get(cell.name)
        if row is not None:
            kept = results.config_path(cell.name)
            if not kept.is_file():
                out_list.append(Status(cell, "conflict", f"its row has no config ({kept} is missing)"))
                continue
            diff = check_cell_config(cell, protocol, read_yaml(kept), lr)
            if diff:
                out_list.append(Status(cell, "conflict", f"its config differs from the protocol: {'; '.join(diff)}"))
                continue
            out_list.append(Status(cell, "done", done_detail(row)))
            continue
        parked = False
        if not (run.exists() and any(run.iterdir())) and checkpoint_step(results.parked_path(cell.name)) is not None:
            run, parked = results.parked_path(cell.name), True  # `run` copies it into OUT and resumes it
        if run.exists() and any(run.iterdir()):
            if not (run / "config.yaml").is_file():
                out_list.append(Status(cell, "conflict", f"{run} exists but is not a run folder (no config.yaml)"))
                continue
            if cell.phase == "seeds" and lr is None:
                out_list.append(Status(cell, "conflict", f"{run} exists but its lr scan is not finished"))
                continue
            finished = (run / "results.json").is_file()
            diff = check_cell_config(cell, protocol, read_yaml(run / "config.yaml"), lr, unfinished=not finished)
            if diff:
                out_list.append(
                    Status(cell, "conflict", f"{run}: config differs from the protocol: {'; '.join(diff)}")
                )
                continue
            if finished:
                out_list.append(Status(cell, "done", "finished, not summarized yet (run or summarize does it)"))
                continue
            step = checkpoint_step(run)
            if step is None:
                out_list.append(Status(cell, "unfinished", "no checkpoint yet: starts again"))
            else:
                done = _forwards_at(run, step)
                detail = f"resumes from step {step} ({done} of {budget_of(cell, protocol) // cell.row.rows} forwards)"
                if parked:
                    detail += f", parked in {run.parent}: its weights are rebuilt from its update log"
                out_list.append(Status(cell, "unfinished", detail, step, done))
            continue
        need = [m for m in cell.row.needs if found_missing[m]]
        if need:
            out_list.append(Status(cell, "unavailable", f"needs {', '.join(need)}, not installed here"))
        elif cell.phase == "seeds" and lr is None:
            if (pick := chosen.get((cell.task, cell.row.name))) is not None:
                detail = f"no stable lr: the watchdog stopped seed runs at every lr of the scan ({format_lrs(pick)})"
            else:
                n = sum(1 for c in grid(protocol) if c.phase == "scan" and c.task == cell.task
                        and c.row.name == cell.row.name and c.name in results.rows)  # fmt: skip
                detail = f"lr scan {n} of {len(protocol.factors(cell.row, cell.task))} done"
            out_list.append(Status(cell, "waiting", detail))
        else:
            out_list.append(Status(cell, "missing"))
    return out_list, chosen


def format_lrs(pick: dict[str, Any]) -> str:
    return ", ".join(f"{v:.3g}" for v in pick.get("unstable", ()))


def done_detail(row: dict[str, Any]) -> str:
    text = f"best dev {row['best_dev']:.3f}, test {row['test']:.3f}" if row.get("test") is not None else "finished"
    if why := instability(row):
        text += f" ({why})"
    return text


# --------------------------------------------------------------------------------------------------------------------
# summarizing finished cells


def prune_what(prune: str, cell: Cell) -> str:
    return prune if prune != "auto" else ("all" if cell.phase == "scan" else "checkpoints")


def prune_run(run: Path, what: str) -> None:
    """Delete a finished run's resume checkpoints (``checkpoints``) and also its best weights (``all``)."""
    for name in {"checkpoints": ("checkpoints",), "all": ("checkpoints", "best")}.get(what, ()):
        if (run / name).is_dir() and (run / "results.json").is_file():
            shutil.rmtree(run / name)


def seed_rows(protocol: Protocol, results: Results, task: str, row: str) -> dict[int, dict[str, Any]]:
    """The finished seed (or reference) rows of (task, row), by seed."""
    out = {}
    for r in results.rows.values():
        if r.get("task") == task and r.get("row") == row and r.get("phase") in ("seeds", "refs"):
            out[r["seed"]] = r
    return {s: out[s] for s in protocol.seeds if s in out}


def device_type(device: Any) -> str:
    """ "cuda:0" → "cuda", "cpu" → "cpu": the kind of device a row or a check ran on."""
    return str(device).split(":")[0]


def from_checks(
    results: Results, cells: Sequence[str], key: str, kinds: Sequence[str]
) -> tuple[str, dict[str, float]] | None:
    """The newest check's ``key`` (``median_step_seconds``, ``train_peak_mem_mb``) of every cell in ``cells``, from
    the first device type in ``kinds`` ("cpu", "cuda") on which each of them has one; None when no type covers all.

    Comparing one type's checks keeps both sides of a comparison on one kind of device even where their rows ran on
    different ones.
    """
    for kind in kinds:
        got: dict[str, float] = {}
        for check in reversed(results.checks):
            if device_type(check.get("device", "cpu")) == kind and check.get(key):
                got.setdefault(check["cell"], float(check[key]))
        if all(c in got for c in cells):
            return kind, {c: got[c] for c in cells}
    return None


def summarize_cell(run: Path, cell: Cell) -> dict[str, Any]:
    """The cell's row: :func:`zotune.bench.accuracy.summarize` plus where it sits in the grid, its device, its total
    seconds and its rows accounting (``forward_equivalents`` = counted forwards × ``rows``)."""
    import yaml

    from ..accuracy import summarize

    row = summarize(run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    res = json.loads((run / "results.json").read_text())
    env = json.loads((run / "env.json").read_text()) if (run / "env.json").is_file() else {}
    section = cfg.get(cell.method, {})
    row.update(
        cell=cell.name,
        phase=cell.phase,
        row=cell.row.name,
        kind=cell.row.kind,
        path=cell.path,
        seed=cfg["seed"],
        lr=section.get(cell.row.scale[0]),
        device=env.get("device") or cfg["model"].get("device"),
        cpu_capability=env.get("versions", {}).get("cpu_capability"),
        seconds=res.get("seconds"),
        stopped=res.get("stopped"),
        rows_per_forward=cell.row.rows,
        forward_equivalents=res["forwards"] * cell.row.rows,
    )
    return row


def summarize_finished(
    protocol: Protocol,
    out: Path,
    results: Results,
    profile: str | None = None,
    log: Callable[[str], None] = print,
    prune: str | None = None,
) -> list[str]:
    """Summarize every finished cell in ``out`` that has no row yet (protocol-checked), write the lr picks; return the
    cells added. Repeats until nothing is added (a finished scan picks the lr its seed cells are checked against).
    A cell whose config differs from the protocol is named and left out. ``prune``: as :func:`run_grid`'s."""
    from ..accuracy import save_config

    added: list[str] = []
    while True:
        new = []
        sts = statuses(protocol, out, results, profile)[0]
        for st in sts:
            if st.state == "done" and st.cell.name not in results.rows:
                run = out / st.cell.name
                results.rows[st.cell.name] = summarize_cell(run, st.cell)
                save_config(run, results.config_path(st.cell.name))
                if prune:
                    prune_run(run, prune_what(prune, st.cell))
                new.append(st.cell.name)
        if not new:
            break
        added += new
        results.save([c.name for c in grid(protocol)])
    for name in set_aside_unstable(protocol, results, out):
        log(f"set aside (stability rule): {name}; its seed runs again at the new pick")
    sts = statuses(protocol, out, results, profile)[0]
    for st in sts:
        if st.state == "conflict":
            log(f"not summarized: {st.cell.name}: {st.detail}")
    write_picks(protocol, results)
    return added


def set_aside_unstable(protocol: Protocol, results: Results, out: Path | None, busy: Sequence[str] = ()) -> list[str]:
    """The stability rule's moves: every seed row at an lr at or above one where a seed run of its (task, row)
    diverged (:func:`unstable_lrs`) goes from ``runs.jsonl`` to ``superseded.jsonl`` (its config to
    ``configs/superseded/``), every such seed cell's run folder in ``out`` (finished or not; ``busy`` cells, running
    now, are left alone) to ``out/superseded/CELL-lrLR``, and its parked copy is dropped, so the cell runs again,
    fresh, at the new pick. Returns the cells moved."""
    moved: list[str] = []
    seed_cells = {c.name: c for c in grid(protocol) if c.phase == "seeds"}
    for name, row in list(results.rows.items()):
        cell = seed_cells.get(name)
        unstable = unstable_lrs(results, row.get("task"), row.get("row")) if cell else []
        if not unstable or row.get("lr") is None or not _at_or_above(row["lr"], unstable[0]):
            continue
        kept, dest = results.config_path(name), results.superseded_config_path(row)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if kept.is_file():
            os.replace(kept, dest)
        if not any(r["cell"] == name and r["lr"] == row["lr"] for r in results.superseded):
            results.superseded.append(row)
        moved.append(name)
    if moved:
        results.set_aside(moved, [c.name for c in grid(protocol)])
    for name, cell in seed_cells.items():
        unstable = unstable_lrs(results, cell.task, cell.row.name)
        if not unstable or name in busy:
            continue
        parked, run = results.parked_path(name), out / name if out is not None else None
        parked_lr, run_lr = _run_lr(parked, cell), _run_lr(run, cell) if run is not None else None
        if parked_lr is not None and _at_or_above(parked_lr, unstable[0]):
            shutil.rmtree(parked)  # a light copy of a run at a left-out lr: restoring it would resume that lr
        if run_lr is not None and _at_or_above(run_lr, unstable[0]):
            _move_run_aside(out, name, run_lr)
        if name not in moved and any(v is not None and _at_or_above(v, unstable[0]) for v in (parked_lr, run_lr)):
            moved.append(name)
    return moved


def _run_lr(run: Path, cell: Cell) -> float | None:
    """The scanned lr a run folder's config holds for ``cell``'s row (None without a config)."""
    if not (run / "config.yaml").is_file():
        return None
    return read_yaml(run / "config.yaml").get(cell.method, {}).get(cell.row.scale[0])


def _move_run_aside(out: Path, name: str, lr: float) -> None:
    """``out/CELL`` → ``out/superseded/CELL-lrLR`` (replacing an older one there), so the cell starts fresh."""
    aside = out / "superseded" / f"{name}-lr{lr:g}"
    aside.parent.mkdir(parents=True, exist_ok=True)
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(out / name, aside)


def set_aside(protocol: Protocol, results: Results, out: Path | None, name: str, why: str) -> dict[str, Any]:
    """Set a finished cell's row aside by hand, with the reason: for a row whose cell an amendment changed after it
    ran (e.g. the path the row takes on a task). Its row goes from ``runs.jsonl`` to ``superseded.jsonl`` with
    ``why``, its config to ``configs/superseded/``, its run folder in ``out`` to ``out/superseded/CELL-lrLR``; the
    cell is then missing and runs again under the protocol. The row stays shown, in no comparison. ValueError (and
    nothing moved) for an empty reason, a cell that is not the grid's or has no row.

    Example: ``python -m zotune.bench.claims set-aside trec-lozo-scan-lr5e-05 --why "ran sequential"``."""
    if not why.strip():
        raise ValueError(f"{name}: say why it is set aside (--why)")
    cell = next((c for c in grid(protocol) if c.name == name), None)
    if cell is None:
        raise ValueError(f"{name}: not a cell of the protocol's grid")
    row = results.rows.get(name)
    if row is None:
        raise ValueError(f"{name}: no row in {results.folder / 'runs.jsonl'} to set aside")
    lr = row.get("lr") if row.get("lr") is not None else (cell.scan_lr if cell.phase == "scan" else None)
    if lr is None:
        raise ValueError(f"{name}: its row records no lr (the set-aside rows are kept by cell and lr)")
    row = {**row, "lr": lr, "why": why.strip()}
    kept, dest = results.config_path(name), results.superseded_config_path(row)
    if not kept.is_file():
        raise ValueError(f"{name}: its config is not kept ({kept} is missing)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(kept, dest)
    results.superseded = [r for r in results.superseded if not (r["cell"] == name and r["lr"] == row["lr"])] + [row]
    results.set_aside([name], [c.name for c in grid(protocol)])
    if out is not None and (out / name).is_dir():
        _move_run_aside(out, name, row["lr"])
    write_picks(protocol, results)
    return row


def write_picks(protocol: Protocol, results: Results) -> None:
    """``RESULTS/lr/TASK-ROW.json`` for every finished scan; a pick whose scan the protocol has since extended (its
    new lrs not run yet) is removed, not left standing."""
    chosen = picks(protocol, results)
    for task in protocol.tasks:
        for row in protocol.rows:
            path = results.folder / "lr" / f"{task}-{row.name}.json"
            pick = chosen.get((task, row.name))
            if pick is None:
                if row.scanned and path.is_file():
                    path.unlink()
                continue
            text = json.dumps(pick, indent=1) + "\n"
            if not path.is_file() or path.read_text() != text:
                atomic_write_text(path, text)


# --------------------------------------------------------------------------------------------------------------------
# parking unfinished cells between machines


def park(
    protocol: Protocol, out: Path, results: Results, profile: str | None = None, log: Callable[[str], None] = print
) -> dict[str, list[str]]:
    """Keep every unfinished cell of ``out`` that has a checkpoint in ``RESULTS/parked/CELL`` without the weights its
    update log rebuilds (a few hundred kB against 0.5 GB; :func:`zotune.train.portable.light_copy`), so that a later
    ``run`` on another checkout resumes it; drop the parked copies of cells that have finished since.

    A parked copy is replaced only by a newer step. Bilevel ZOFO's first-order adapters, which the log does not
    rebuild, are carried as they are (a few MiB); a cell with a larger file than a light copy takes is named and left
    out."""
    from ...train.portable import light_copy

    done: dict[str, list[str]] = {"parked": [], "kept": [], "dropped": [], "refused": []}
    for st in statuses(protocol, out, results, profile)[0]:
        name, dest = st.cell.name, results.parked_path(st.cell.name)
        if st.state == "done" and dest.exists():
            shutil.rmtree(dest)
            done["dropped"].append(name)
            log(f"{name}: finished; its parked copy is dropped")
            continue
        local = out / name
        if st.state != "unfinished" or st.resume_step is None or not (local / "config.yaml").is_file():
            continue
        if (checkpoint_step(dest) or -1) >= st.resume_step:
            done["kept"].append(name)
            continue
        try:
            copied = light_copy(local, dest)
        except ValueError as err:
            done["refused"].append(name)
            log(f"{name}: not parked: {err}")
            continue
        done["parked"].append(name)
        log(f"{name}: parked at step {copied['step']} in {dest} ({copied['bytes'] / 1e3:.0f} kB)")
    return done


def restore_parked(cell: str, out: Path, results: Results) -> bool:
    """Copy the parked run of ``cell`` into ``OUT/CELL`` when that folder is absent or empty (the cell then resumes
    from it, its weights rebuilt from its update log); whether it did."""
    src, run = results.parked_path(cell), out / cell
    if checkpoint_step(src) is None or (run.exists() and any(run.iterdir())):
        return False
    tmp = out / f".restoring-{cell}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if run.exists():
        run.rmdir()
    os.replace(tmp, run)
    return True
