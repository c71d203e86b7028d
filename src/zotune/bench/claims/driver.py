"""The resumable driver: runs pending cells in lanes under a deadline, summarizes them, and estimates the time left."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...core.log import atomic_write_text
from .protocol import PROFILES, Cell, Protocol, budget_of, cell_tree, grid, resolved
from .results import (
    Results,
    Status,
    checkpoint_step,
    device_type,
    done_detail,
    format_lrs,
    park,
    picks,
    prune_run,
    prune_what,
    restore_parked,
    set_aside_unstable,
    statuses,
    summarize_cell,
    summarize_finished,
    write_picks,
)


@dataclass
class Lane:
    cell: Cell
    proc: subprocess.Popen
    began: float
    log: Path


def _child_env(threads: int) -> dict[str, str]:
    """The cells' environment: this checkout's ``src`` first on PYTHONPATH (no install needed), ``threads`` intra-op
    threads per cell unless set already, unbuffered output for the logs."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = os.pathsep.join([src, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(key, str(threads))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _estimate(cell: Cell, status: Status, protocol: Protocol, results: Results, device: str) -> float | None:
    """Seconds the cell still needs: the median rate (seconds per forward) of the finished cells on the same device
    that are most like it: the same row, method and task; else the same row and method on another task; else the
    same row; else the slowest rate of any row there (a cell too long for the time left should not start only to be
    stopped unfinished). The method matters: a row that runs packed on one task and sequential on another has two
    rates. A row's seconds are its last process's (set-up and tests included) or, for a run resumed across
    processes, the training loop's seconds summed over them, whichever is larger. None when nothing has finished on
    the device."""
    rates: dict[tuple[str, ...], list[float]] = {}
    for r in results.rows.values():
        seconds = max(r.get("seconds") or 0.0, r.get("train_seconds") or 0.0)
        if seconds and str(r.get("device", "")).startswith(device[:3]):
            rate = seconds / max(1, r["forward_equivalents"])
            row, method = r.get("row", ""), r.get("method", "")
            for key in ((row, method, r.get("task", "")), (row, method), (row,)):
                rates.setdefault(key, []).append(rate)
    if not rates:
        return None
    keys = ((cell.row.name, cell.method, cell.task), (cell.row.name, cell.method), (cell.row.name,))
    found = next((rates[k] for k in keys if k in rates), None)
    rate = statistics.median(found) if found else max(map(max, rates.values()))
    left = budget_of(cell, protocol) - status.forwards_done * cell.row.rows
    return rate * left


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """One driver per output folder at a time."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".claims.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RuntimeError(
                f"another `claims run` is using {out} (its lock {out / '.claims.lock'} is held)"
            ) from None
        yield


@contextlib.contextmanager
def _signals_stop(flag: dict[str, Any]) -> Iterator[None]:
    """SIGINT/SIGTERM to the driver: stop launching, stop the running cells cleanly (as at the deadline)."""

    def handler(signum: int, _frame: Any) -> None:
        flag["signal"] = signal.Signals(signum).name

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def selected(st: Status, only: Sequence[str], phase: str | None) -> bool:
    if phase is not None and st.cell.phase != phase:
        return False
    return not only or any(fnmatch.fnmatchcase(st.cell.name, p) for p in only)


def _priority(st: Status, only: Sequence[str]) -> int:
    """Launch priority: the index of the first ``--only`` glob the cell matches (the globs' order is the order in
    which their cells start; grid order among the cells of one glob)."""
    return next((i for i, p in enumerate(only) if fnmatch.fnmatchcase(st.cell.name, p)), len(only))


def run_grid(
    protocol: Protocol,
    out: str | Path,
    results_dir: str | Path,
    *,
    device: str = "cpu",
    profile: str | None = None,
    lanes: int = 1,
    only: Sequence[str] = (),
    phase: str | None = None,
    deadline: float | None = None,
    grace: float = 60.0,
    carry_over: bool = False,
    prune: str = "auto",
    threads: int | None = None,
    max_failures: int = 3,
    model: str | None = None,
    poll: float = 2.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the pending cells (missing or unfinished; seeds once their lr is picked) as ``lanes`` parallel
    subprocesses; summarize each finished cell into ``results_dir`` as it ends; return what happened (also written
    to ``out/last-run.json``).

    ``deadline`` (seconds from now): no cell starts after it, nor one whose estimated time left (from finished cells
    of its row on this device) exceeds the time left; at the deadline the running cells get SIGTERM (the training
    loop stops them at a step boundary with a checkpoint where it supports that, else the last checkpoint stays) and,
    ``grace`` seconds later, SIGKILL. ``carry_over``: start cells whose estimate exceeds the time left too, so that
    no lane idles before the deadline; the deadline stops them with a checkpoint and a later run resumes them (their
    run folders must survive until then). SIGINT/SIGTERM to the driver do the same at once. After ``max_failures``
    cells failed (not stopped), no more cells start. ``prune``: what a finished cell keeps (``auto``: scan cells keep
    no weights, the others their best weights; ``none``; ``checkpoints``: drop the resume checkpoints; ``all``)."""
    out, results = Path(out), Results.load(results_dir)
    profile = profile or profile_of(device)
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, lanes))
    began, flag = time.monotonic(), {}
    running: dict[str, Lane] = {}
    outcomes: dict[str, str] = {}
    attempted: set[str] = set()
    failures, stopping, no_launch, stop_at, killed = 0, None, None, 0.0, False
    env = _child_env(threads)
    order = [c.name for c in grid(protocol)]
    model_ready, changed = False, True
    with _lock(out), _signals_stop(flag):
        summarize_finished(protocol, out, results, profile, log, prune=prune)
        while True:
            for name, lane in list(running.items()):  # reap the cells that ended
                rc = lane.proc.poll()
                if rc is None:
                    continue
                del running[name]
                outcome, failed = _reap(lane, rc, protocol, out, results, order, prune)
                outcomes[name], failures, changed = outcome, failures + failed, True
                log(f"[{time.monotonic() - began:7.0f} s] {name}: {outcome}")
                for moved in set_aside_unstable(protocol, results, out, busy=list(running)):
                    attempted.discard(moved)
                    log(f"[{time.monotonic() - began:7.0f} s] set aside (stability rule): {moved}")
            now = time.monotonic() - began
            if stopping is None and (flag.get("signal") or (deadline is not None and now >= deadline)):
                stopping = f"{flag['signal']} to the driver" if flag.get("signal") else f"deadline ({deadline:g} s)"
                stop_at = now
                log(f"[{now:7.0f} s] stopping ({stopping}): SIGTERM to {len(running)} running cell(s)")
                for lane in running.values():
                    lane.proc.send_signal(signal.SIGTERM)
            elif stopping is not None and running and not killed and now - stop_at > grace:
                log(f"[{now:7.0f} s] {len(running)} cell(s) still running {grace:g} s after SIGTERM: SIGKILL")
                for lane in running.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(lane.proc.pid, signal.SIGKILL)
                killed = True
            if no_launch is None and failures >= max_failures:
                no_launch = f"{failures} cells failed (see their logs): no more cells start"
                log(f"[{now:7.0f} s] {no_launch}")
            ready: list[Status] = []
            if stopping is None and no_launch is None and changed:
                ready = [
                    st for st in statuses(protocol, out, results, profile)[0]
                    if st.state in ("missing", "unfinished") and st.cell.name not in attempted
                    and st.cell.name not in running and selected(st, only, phase)
                ]  # fmt: skip
                ready.sort(key=lambda st: _priority(st, only))  # stable: grid order within one glob
                changed = False
                for st in ready:
                    if len(running) >= lanes:
                        changed = True  # the cells left over start when a lane frees up
                        break
                    attempted.add(st.cell.name)
                    est = _estimate(st.cell, st, protocol, results, device)
                    short = deadline is not None and est is not None and est > deadline - now
                    if short and not carry_over:
                        outcomes[st.cell.name] = f"not started: needs ~{est:.0f} s, {deadline - now:.0f} s left"
                        continue
                    if not model_ready:
                        _prepare_model(model or protocol.model, log)
                        model_ready = True
                    lr = picks(protocol, results).get((st.cell.task, st.cell.row.name), {}).get("lr")
                    if restore_parked(st.cell.name, out, results):
                        log(f"[{now:7.0f} s] {st.cell.name}: copied from {results.parked_path(st.cell.name)}")
                    try:
                        running[st.cell.name] = _launch(st, protocol, out, device, lr, model, env)
                    except ValueError as err:  # a config the protocol cannot build (a bad row): named, not run
                        outcomes[st.cell.name], failures = f"failed: {err}", failures + 1
                        continue
                    later = (
                        f"; needs ~{est:.0f} s, {deadline - now:.0f} s left: a later run resumes it" if short else ""
                    )
                    log(f"[{now:7.0f} s] started {st.cell.name} ({st.detail or 'fresh'}{later})")
            if not running and not ready:
                break
            time.sleep(poll)
        park(protocol, out, results, profile, log)  # unfinished cells outlive this checkout's OUT folder
    final, _ = statuses(protocol, out, results, profile)
    counts: dict[str, int] = {}
    for st in final:
        counts[st.state] = counts.get(st.state, 0) + 1
    summary = {
        "seconds": round(time.monotonic() - began, 1),
        "device": device,
        "profile": profile,
        "lanes": lanes,
        "stopped": stopping or no_launch,
        "outcomes": outcomes,
        "counts": counts,
    }
    atomic_write_text(out / "last-run.json", json.dumps(summary, indent=1) + "\n")
    log(format_summary(summary))
    return summary


def profile_of(device: str) -> str:
    """The profile of a device: ``cpu`` for cpu, ``gpu`` for cuda."""
    return {v: k for k, v in PROFILES.items()}.get(device_type(device), "cpu")


def _prepare_model(name: str, log: Callable[[str], None]) -> None:
    """A GGUF model is converted once here, before the lanes start (not by every lane at the same time). A model
    that cannot be resolved is left to the cells, whose logs then say why."""
    from ...models.load import ModelLoadError, convert_gguf, resolve

    try:
        found = resolve(name)
        if found.gguf_path is not None:
            convert_gguf(found)
    except (ModelLoadError, OSError, ValueError) as err:
        log(f"model {name}: {err}")


def _launch(
    st: Status, protocol: Protocol, out: Path, device: str, lr: float | None, model: str | None, env: dict[str, str]
) -> Lane:
    import yaml

    cell = st.cell
    tree = resolved(cell_tree(cell, protocol, out=out, device=device, lr=lr, model=model))
    config = out / "cells" / f"{cell.name}.yaml"
    atomic_write_text(config, yaml.safe_dump(tree, sort_keys=False))
    log_path = out / "logs" / f"{cell.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "zotune.bench.claims", "cell", str(config)]
    with open(log_path, "a") as fh:
        fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {st.detail or 'fresh start'}: {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return Lane(cell, proc, time.monotonic(), log_path)


def _reap(
    lane: Lane, rc: int, protocol: Protocol, out: Path, results: Results, order: list[str], prune: str
) -> tuple[str, int]:
    """The outcome of an ended cell (and 1 if it failed); a finished one is summarized and pruned."""
    from ..accuracy import save_config

    run, took = out / lane.cell.name, time.monotonic() - lane.began
    if (run / "results.json").is_file():
        row = summarize_cell(run, lane.cell)
        results.rows[lane.cell.name] = row
        save_config(run, results.config_path(lane.cell.name))
        results.save(order)
        write_picks(protocol, results)
        prune_run(run, prune_what(prune, lane.cell))
        return f"finished in {took:.0f} s: {done_detail(row)}", 0
    step = checkpoint_step(run) if run.is_dir() else None
    where = f"resumable from step {step}" if step is not None else "no checkpoint yet"
    if rc in (130, 143, -signal.SIGTERM, -signal.SIGINT, -signal.SIGKILL):
        return f"stopped after {took:.0f} s ({where})", 0
    return f"failed (exit {rc}) after {took:.0f} s, {where}: see {lane.log}", 1


def format_summary(summary: dict[str, Any]) -> str:
    stopped = f"; stopped: {summary['stopped']}" if summary["stopped"] else ""
    head = f"claims run: {summary['seconds']:.0f} s on {summary['device']} ({summary['profile']} profile)"
    lines = [f"{head}, {summary['lanes']} lane(s){stopped}"]
    lines += [f"  {name}: {what}" for name, what in summary["outcomes"].items()]
    lines.append("  grid now: " + ", ".join(f"{n} {s}" for s, n in sorted(summary["counts"].items())))
    return "\n".join(lines)


def cell_time_left(sts: Sequence[Status], protocol: Protocol, results: Results, device: str) -> dict[str, float]:
    """Seconds of cell time the unfinished cells still need on ``device``, by phase, at the measured rates of the
    finished cells there (:func:`_estimate`); divide by the lanes for wall-clock. Empty when nothing finished there.

    >>> cell_time_left([], Protocol(), Results(Path("no-results")), "cpu")
    {}
    """
    left: dict[str, float] = {}
    for st in sts:
        if st.state in ("missing", "unfinished", "waiting"):
            est = _estimate(st.cell, st, protocol, results, device)
            if est is None:
                return {}
            left[st.cell.phase] = left.get(st.cell.phase, 0.0) + est
    return left


def format_plan(
    sts: Sequence[Status],
    chosen: dict[tuple[str, str], dict[str, Any]],
    protocol: Protocol,
    results: Results | None = None,
) -> str:
    lines = [f"{'cell':36} {'phase':6} {'lr':>9} {'seed':>4} {'forwards':>8}  {'status':11} detail"]
    left = 0
    for st in sts:
        c = st.cell
        if c.phase == "scan":
            lr = f"{c.scan_lr:.3g}"
        elif c.phase == "seeds":
            picked = chosen.get((c.task, c.row.name), {}).get("lr")
            lr = "(scan)" if (c.task, c.row.name) not in chosen else "(none)" if picked is None else f"{picked:.3g}"
        else:
            lr = f"{c.row.hparams[c.row.scale[0]]:.3g}"
        budget = budget_of(c, protocol)
        if st.state in ("missing", "unfinished", "waiting"):
            left += budget - st.forwards_done * c.row.rows
        lines.append(f"{c.name:36} {c.phase:6} {lr:>9} {c.seed:>4} {budget:>8}  {st.state:11} {st.detail}")
    counts: dict[str, int] = {}
    for st in sts:
        counts[st.state] = counts.get(st.state, 0) + 1
    lines.append("")
    lines.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"; {left:,} forwards to run")
    for device in ("cpu", "cuda") if results is not None else ():
        # a row with no finished cell on the device is charged the slowest measured rate there
        if times := cell_time_left(sts, protocol, results, device):
            parts = ", ".join(f"{phase} {sec / 3600:.1f} h" for phase, sec in sorted(times.items()))
            lines.append(
                f"cell time left on {device} at its measured rates: {sum(times.values()) / 3600:.1f} h ({parts}); "
                "÷ lanes for wall-clock"
            )
    for (task, row), p in sorted(chosen.items()):
        notes = [
            " on the grid's edge" if p["edge"] else "",
            "" if p["beats_zero_shot"] or p["lr"] is None else ", no lr beat zero-shot dev",
            f", diverged in a seed run at {format_lrs(p)} (stability rule)" if p.get("unstable") else "",
        ]
        devs = " ".join(f"{q['lr']:.3g}:{q['best_dev']:.3f}" for q in p["grid"])
        lr = "none" if p["lr"] is None else f"{p['lr']:.3g}"
        lines.append(f"lr pick {task}-{row}: {lr}{''.join(notes)} (best dev by lr: {devs})")
    return "\n".join(lines)
