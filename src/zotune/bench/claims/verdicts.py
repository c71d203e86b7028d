"""The claims table: per claim the measured numbers over seeds and a verdict, the methods tables, and the curves."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...core.log import atomic_write_text
from .protocol import BEST_ZO, CLAIMS, PROTOCOL, Comparison, Protocol, grid
from .reach import reach_lines
from .results import (
    LOSS_ROSE,
    Results,
    check_cell_config,
    device_type,
    format_lrs,
    from_checks,
    instability,
    picks,
    read_yaml,
    seed_rows,
)


def verdict(values: Sequence[float]) -> tuple[str, float, float]:
    """The verdict on a claim from its per-seed values x_s (positive where the claim holds on seed s; see
    :class:`Comparison`), with their mean and sample standard deviation (n − 1).

    * *holds*: mean > std (the claim's side by more than the seed spread), or x_s > 0 on every seed;
    * *does not hold at this scale*: mean < −std, or x_s < 0 on every seed;
    * *inconclusive (spread larger than the difference)*: otherwise.

    With 3 seeds, mean > std is a paired t statistic above √3 ≈ 1.73 (one-sided p ≈ 0.11 under normality) and the
    same sign on all three seeds has one-sided p = 0.125 under a symmetric null: a rule for the spread of this grid,
    not a significance test. The sign rule keeps a skewed x (every seed on one side, one far out) from reading as
    inconclusive.
    """
    if len(values) < 2:
        raise ValueError("a verdict needs at least 2 seeds")
    m, s = statistics.fmean(values), statistics.stdev(values)
    if m > s or all(v > 0 for v in values):
        return "holds", m, s
    if m < -s or all(v < 0 for v in values):
        return "does not hold at this scale", m, s
    return "inconclusive (spread larger than the difference)", m, s


def first_reach(row: dict[str, Any], target: float) -> tuple[int, float | None] | None:
    """(forward equivalents, training seconds) at the first dev evaluation ≥ ``target``; None: never reached."""
    k = row.get("rows_per_forward", 1)
    curves = row.get("curves", {})
    seconds = dict((f, s) for f, s in curves.get("dev_seconds", []))
    for f, acc in curves.get("dev", []):
        if acc is not None and acc >= target - 1e-12:
            return f * k, seconds.get(f)
    return None


def _mean_sd(values: Sequence[float], digits: int = 3, signed: bool = False) -> str:
    fmt = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.fmean(values))} ± {sd:.{digits}f}"


def _best_zo(protocol: Protocol, results: Results, task: str) -> str | None:
    full = {
        r.name: statistics.fmean(x["test"] for x in rows.values())
        for r in protocol.rows
        if r.kind == "zo"
        and r.runs_on(task)
        and len(rows := seed_rows(protocol, results, task, r.name)) == len(protocol.seeds)
    }
    return max(full, key=full.get) if full else None


def check_results(protocol: Protocol, results: Results) -> None:
    """Refuse results the table cannot use: a row without its kept config, or whose config differs from the
    protocol (named, with the key). ValueError with one line per problem; nothing is written."""
    cells = {c.name: c for c in grid(protocol)}
    chosen = picks(protocol, results)
    problems = []
    for name in results.rows:
        cell = cells.get(name)
        if cell is None:
            problems.append(f"{name}: not a cell of the protocol's grid")
            continue
        kept = results.config_path(name)
        if not kept.is_file():
            problems.append(f"{name}: its config is not kept ({kept} is missing)")
            continue
        lr = chosen.get((cell.task, cell.row.name), {}).get("lr")
        diff = check_cell_config(cell, protocol, read_yaml(kept), lr)
        if diff:
            problems.append(f"{name}: config differs from the protocol: {'; '.join(diff)}")
    for name in results.reach:
        if not (results.folder / "configs" / "reach" / f"{name}.yaml").is_file():
            problems.append(f"{name} (reach): its config is not kept (configs/reach/{name}.yaml is missing)")
    for row in results.superseded:
        if not results.superseded_config_path(row).is_file():
            problems.append(f"{row['cell']} (set aside): its config is not kept "
                            f"({results.superseded_config_path(row)} is missing)")  # fmt: skip
    if problems:
        raise ValueError("; ".join(problems))


def load_why(results: Results, protocol: Protocol) -> dict[str, str]:
    """``RESULTS/why.yaml``: ``"<comparison id>/<task>": one sentence``. An unknown key is an error (a typo would
    otherwise drop a sentence)."""
    import yaml

    path = results.folder / "why.yaml"
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of '<comparison id>/<task>': text")
    valid = {f"{c.id}/{t}" for c in protocol.comparisons for t in protocol.tasks}
    for key in data:
        if key not in valid:
            raise ValueError(f"{path}: unknown key {key!r} (keys are '<id>/<task>', e.g. '1a/sst2'; ids: "
                             f"{', '.join(c.id for c in protocol.comparisons)})")  # fmt: skip
    return {k: str(v) for k, v in data.items()}


def _measured(comp: Comparison, results: Results, a: dict, b: dict) -> dict[str, Any]:
    """A step-time or memory comparison's value per seed cell, and where it comes from, or why it has none.

    * Step times: the cells' newest timing checks when every cell of both sides has one on one device type. They
      ran one after the other under the same load and with the code as it is now; the rows' own medians ran
      alongside whatever the other lane ran then. Else the rows' medians, if the rows ran on one device.
    * Peaks: the rows' training-phase peaks when the rows ran on one device and all log one (rows before it logged
      the process's peak only, set-up included); else every cell's newest memory check on one device type.
    """
    both = [*a.values(), *b.values()]
    cells = [r["cell"] for r in both]
    devices = sorted({str(r.get("device")) for r in both})
    step = comp.measure == "step"
    key = "median_step_seconds" if step else "train_peak_mem_mb"
    # the rows' own device types first, then any other that checks ran on
    kinds = sorted({device_type(d) for d in devices}) + sorted(
        {device_type(c.get("device", "cpu")) for c in results.checks}
    )
    checked = from_checks(results, cells, key, list(dict.fromkeys(kinds)))
    rows_ok = len(devices) == 1 and (step or all(r.get(key) for r in both))
    what = "timing" if step else "memory"
    if checked and (step or not rows_ok):
        return {"value": checked[1], "source": f"{what} checks on {checked[0]}"}
    if rows_ok:
        return {"value": {r["cell"]: r.get(key) for r in both}, "source": "rows"}
    how = "(python -m zotune.bench.claims check CELL --device DEVICE --record)"
    if len(devices) > 1:
        return {"missing": f"not comparable: ran on different devices ({', '.join(devices)}), and not every cell has "
                           f"a {what} check on one device type {how}"}  # fmt: skip
    unmeasured = [r["cell"] for r in both if not r.get(key)]
    return {"missing": f"missing: the training phase's peak of {', '.join(unmeasured)} {how}"}


def compare(comp: Comparison, protocol: Protocol, results: Results, task: str) -> dict[str, Any]:
    """One comparison on one task: the two sides' values, the per-seed x_s and the verdict (or why there is none)."""
    a_name = _best_zo(protocol, results, task) if comp.a == BEST_ZO else comp.a
    b_name = _best_zo(protocol, results, task) if comp.b == BEST_ZO else comp.b
    out: dict[str, Any] = {"a": a_name, "b": b_name}
    by_name = {r.name: r for r in protocol.rows}
    if a_name is None or b_name is None:
        out["missing"] = "no pure-ZO row has all its seeds yet"
        return out
    if a_name not in by_name or b_name not in by_name:
        out["missing"] = "not in this grid"
        return out
    a, b = seed_rows(protocol, results, task, a_name), seed_rows(protocol, results, task, b_name)
    n = len(protocol.seeds)
    if len(a) < n or len(b) < n:
        # A row with no seeds that only one profile's grid holds (the fp32-base SensZOQ: gpu) is never run on the
        # other device: say so, rather than leave it looking like work still to do.
        only = [f"{m} runs in the {by_name[m].profiles[0]} profile only"
                for m, got in ((a_name, a), (b_name, b)) if not got and len(by_name[m].profiles) == 1]  # fmt: skip
        note = f" ({'; '.join(only)})" if only else ""
        out["missing"] = f"missing: {a_name} {len(a)} of {n} seeds, {b_name} {len(b)} of {n}{note}"
        return out
    seeds = protocol.seeds
    if comp.measure == "test":
        va, vb = [a[s]["test"] for s in seeds], [b[s]["test"] for s in seeds]
        x = [p - q + comp.margin for p, q in zip(va, vb, strict=True)]
        out["shown"] = (
            _mean_sd(va),
            _mean_sd(vb),
            _mean_sd([p - q for p, q in zip(va, vb, strict=True)], signed=True),
        )
    elif comp.measure == "reach":
        need, mine, censored = [], [], 0
        for s in seeds:
            m = first_reach(b[s], b[s]["best_dev"])
            need.append(m[0] if m else 0)
            got = first_reach(a[s], b[s]["best_dev"])
            if got is None:
                censored += 1
            # never reached: counted at its full budget, also when the run stopped early (the watchdog)
            mine.append(got[0] if got else max(a[s]["forward_equivalents"], a[s].get("budget") or protocol.budget))
        if any(v == 0 for v in need):
            out["missing"] = f"inconclusive: {b_name}'s best dev is its step-0 dev on some seed"
            return out
        x = [comp.margin - f / m for f, m in zip(mine, need, strict=True)]
        ratios = [f / m for f, m in zip(mine, need, strict=True)]
        note = f" ({censored} not reached: counted at the budget)" if censored else ""
        out["shown"] = (f"{statistics.fmean(mine):.0f} forwards{note}", f"{statistics.fmean(need):.0f} forwards",
                        f"ratio {_mean_sd(ratios, 2)}")  # fmt: skip
    else:
        got = _measured(comp, results, a, b)
        if "missing" in got:
            out["missing"] = got["missing"]
            return out
        va, vb, out["source"] = (
            [got["value"][a[s]["cell"]] for s in seeds],
            [got["value"][b[s]["cell"]] for s in seeds],
            got["source"],
        )
        if any(v is None or v <= 0 for v in vb):
            out["missing"] = f"{b_name} has no {'median step time' if comp.measure == 'step' else 'peak'}"
            return out
        x = [1 - p / q for p, q in zip(va, vb, strict=True)]
        unit, digits = ("s/step", 3) if comp.measure == "step" else ("MiB", 0)
        source = f" ({'training phase, ' if comp.measure != 'step' else ''}from the {out['source']})"
        out["shown"] = (f"{_mean_sd(va, digits)} {unit}", f"{_mean_sd(vb, digits)} {unit}",
                        f"ratio {_mean_sd([p / q for p, q in zip(va, vb, strict=True)], 2)}{source}")  # fmt: skip
    out["x"] = x
    out["verdict"], out["mean"], out["sd"] = verdict(x)
    return out


def methods_table(protocol: Protocol, results: Results, task: str, chosen: dict) -> list[str]:
    """Per method: its lr, test mean ± std and per seed, best dev, forwards and seconds to MeZO's peak dev."""
    mezo = seed_rows(protocol, results, task, "mezo")
    n = len(protocol.seeds)
    anyrow = next((r for r in results.rows.values() if r.get("task") == task and r.get("test_n")), None)
    zs = f"zero-shot test {anyrow['zero_shot_test']:.3f}, " if anyrow and anyrow.get("zero_shot_test") else ""
    test_n = anyrow.get("test_n") if anyrow else f"{protocol.tasks[task].get('n_test', '?')}, planned"
    lines = [
        f"#### {task} (test n = {test_n}; {zs}seeds {', '.join(map(str, protocol.seeds))})",
        "",
        "| method | path | lr | test, mean ± std | per seed | best dev, mean | forwards to MeZO's peak dev | "
        "seconds to MeZO's peak dev | s/step (median) | process peak MiB (set-up included) | device |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in (r for r in protocol.rows if r.runs_on(task)):
        rows = seed_rows(protocol, results, task, row.name)
        if row.scanned:
            p = chosen.get((task, row.name))
            if p is None:
                lr = "scan unfinished"
            elif p["lr"] is None:
                lr = f"none stable (diverged at {format_lrs(p)})"
            else:
                lr = f"{p['lr']:.3g}" + (" (grid edge)" if p["edge"] else "")
                lr += f" (diverged at {format_lrs(p)})" if p.get("unstable") else ""
        else:
            lr = f"{row.hparams[row.scale[0]]:.3g}"
        per = " / ".join(f"{rows[s]['test']:.3f}" if s in rows else "missing" for s in protocol.seeds)
        if not rows:
            ran = any(r.get("row") == row.name and r.get("task") == task for r in results.rows.values())
            if len(row.profiles) == 1 and not ran:
                lr = f"not run ({row.profiles[0]} profile only)"  # as in compare(): not work still to do
            lines.append(f"| {row.label} | {row.path_on(task)} | {lr} | missing (0 of {n} seeds) | "
                         "— | — | — | — | — | — | — |")  # fmt: skip
            continue
        done = len(rows) == n
        test = _mean_sd([r["test"] for r in rows.values()]) if done else f"missing ({len(rows)} of {n} seeds)"
        dev = f"{statistics.fmean(r['best_dev'] for r in rows.values()):.3f}" if done else "—"
        reach_f, reach_s = "—", "—"
        if done and len(mezo) == n:
            hits = [first_reach(rows[s], mezo[s]["best_dev"]) for s in protocol.seeds]
            if all(h is not None for h in hits):
                reach_f = f"{statistics.fmean(h[0] for h in hits):.0f}"
                secs = [h[1] for h in hits]
                reach_s = f"{statistics.fmean(secs):.0f}" if all(v is not None for v in secs) else "—"
            else:
                reached = sum(h is not None for h in hits)
                reach_f = reach_s = f"reached by {reached} of {n} seeds"
        steps = [r["median_step_seconds"] for r in rows.values() if r.get("median_step_seconds")]
        step = f"{statistics.median(steps):.3f}" if steps and done else "—"
        peak = f"{max(r.get('peak_mem_mb') or 0 for r in rows.values()):.0f}" if done else "—"
        on = {str(r.get("device")) for r in rows.values()}
        devices = next(iter(on))
        if len(on) > 1:  # seconds and memory do not compare across devices: none shown, each seed's device named
            step = peak = "— (mixed devices)"
            reach_s = "—" if reach_s[:1].isdigit() else reach_s
            devices = ", ".join(f"s{s}: {rows[s].get('device')}" for s in protocol.seeds if s in rows)
        lines.append(f"| {row.label} | {row.path_on(task)} | {lr} | {test} | {per} | {dev} | {reach_f} | {reach_s} | "
                     f"{step} | {peak} | {devices} |")  # fmt: skip
    return lines + [""]


def claims_section(protocol: Protocol, results: Results, base: str | Path, *, level: int = 2) -> list[str]:
    """The claims section of the results page, as markdown lines, its links relative to the folder ``base`` of the
    page. Refuses (ValueError) rows without their config or off the protocol (:func:`check_results`) and an unknown
    key in ``why.yaml``."""
    check_results(protocol, results)
    why = load_why(results, protocol)
    chosen = picks(protocol, results)
    root = Path(__file__).resolve().parents[4]

    def link(p: Path) -> str:
        return os.path.relpath(
            (root / p if str(p).startswith("benchmarks/README") else p).resolve(), Path(base).resolve()
        )

    h = "#" * level
    seeds = ", ".join(map(str, protocol.seeds))
    lines = [
        f"{h} Do the papers' claims hold? (SmolLM2-135M, seeds {seeds})",
        "",
        f"Protocol: [benchmarks/README.md, Claims grid: protocol]({link(Path('benchmarks/README.md'))}"
        "#claims-grid-protocol) (written before the runs). Rows: "
        f"[runs.jsonl]({link(results.folder / 'runs.jsonl')}), each with its config in "
        f"[configs/]({link(results.folder / 'configs')}); lr picks in [lr/]({link(results.folder / 'lr')}). "
        f"Test accuracy of the best-on-dev weights; budget {protocol.budget} forwards of batch {protocol.batch_size} "
        f"per ZO run (rows evaluated ÷ {protocol.batch_size}), FO references {protocol.ref_budget} forward + "
        f"backward passes. The data are the same for every seed (data seed 0): seeds vary the ZO directions and "
        "initialisations only, and comparisons are paired by seed.",
        "",
        "Verdict rule: per seed s a value x_s that is positive where the claim holds (a test-accuracy difference, "
        "plus the margin for 'within m points'; for compute, 0.6 − forwards ratio; for step time and memory, "
        "1 − ratio); *holds* when mean(x) > std(x) or x > 0 on every seed, *does not hold at this scale* when "
        "mean(x) < −std(x) or x < 0 on every seed, else *inconclusive (spread larger than the difference)*; std "
        "over seeds with n − 1. A claim with a seed missing gets no verdict.",
        "",
        f"{h}# Methods",
        "",
    ]
    for task in protocol.tasks:
        lines += methods_table(protocol, results, task, chosen)
        fig = results.folder / f"curves-{task}.png"
        if fig.is_file():
            lines += [f"Dev accuracy of every seed against forwards and against wall-clock: "
                      f"[curves-{task}.png]({link(fig)})", ""]  # fmt: skip
    lines += [f"{h}# Claims", ""]
    by_name = {r.name: r for r in protocol.rows}
    for claim in sorted({c.claim for c in protocol.comparisons}, key=lambda c: (c == 0, c)):
        comps = [c for c in protocol.comparisons if c.claim == claim]
        title = CLAIMS.get(claim, f"claim {claim}")
        lines += [f"**{claim}. {title}**" if claim else f"**{title}**", ""]
        lines += ["| id | task | comparison | A | B | A − B (or ratio) | mean(x) ± std(x) | verdict | why |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for comp in comps:
            for task in protocol.tasks:
                if any(n in by_name and not by_name[n].runs_on(task) for n in (comp.a, comp.b)):
                    continue  # a row the protocol runs on other tasks only
                res = compare(comp, protocol, results, task)
                text = comp.text
                if comp.a == BEST_ZO or comp.b == BEST_ZO:
                    text += f" [{res['a'] or '?'} vs {res['b'] or '?'}]"
                reason = why.get(f"{comp.id}/{task}", "—")
                if "missing" in res:
                    lines.append(f"| {comp.id} | {task} | {text} | — | — | — | — | {res['missing']} | {reason} |")
                    continue
                a, b, d = res["shown"]
                lines.append(f"| {comp.id} | {task} | {text} | {a} | {b} | {d} | {res['mean']:+.3f} ± {res['sd']:.3f} "
                             f"| **{res['verdict']}** | {reason} |")  # fmt: skip
        lines.append("")
    lines += _fo_gap_lines(protocol, results) + reach_lines(protocol, results, link(results.folder / "reach.jsonl"))
    lines += _scan_lines(protocol, chosen)
    return lines + _superseded_lines(results)


def _superseded_lines(results: Results) -> list[str]:
    """The runs set aside (by the stability rule, or by hand with a reason): kept, shown, and left out of every
    comparison."""
    if not results.superseded:
        return []
    lines = [
        "Runs set aside (left out of every comparison; each cell runs again under the protocol). Stability rule: "
        "a seed run of the row diverged at this lr or a smaller one (the watchdog stopped it, or its training loss "
        f"ended above {LOSS_ROSE:g} × its start), and the row's seeds run again at the next pick below:",
        "",
        "| cell | lr | best dev | test | forwards | stopped | why |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results.superseded, key=lambda r: (r["cell"], r["lr"])):
        test = f"{r['test']:.3f}" if r.get("test") is not None else "—"
        lines.append(f"| {r['cell']} | {r['lr']:.3g} | {r['best_dev']:.3f} | {test} | {r.get('forwards', '—')} | "
                     f"{r.get('stopped') or '—'} | {r.get('why') or _rule_why(r)} |")  # fmt: skip
    return lines + [""]


def _rule_why(row: dict[str, Any]) -> str:
    own = instability(row)
    return f"stability rule ({own})" if own else "stability rule (another seed at this lr or below diverged)"


def _fo_gap_lines(protocol: Protocol, results: Results) -> list[str]:
    """The best pure-ZO row against FO full per task, every seed, and against the committed FO full number."""
    lines = []
    for task, committed in protocol.fo_full_committed.items():
        if task not in protocol.tasks:
            continue
        best = _best_zo(protocol, results, task)
        fo = seed_rows(protocol, results, task, "fo-full")
        if best is None or len(fo) < len(protocol.seeds):
            lines += [f"Best pure-ZO method vs FO full on {task}: missing (not every seed has run).", ""]
            continue
        zo = seed_rows(protocol, results, task, best)
        gaps = [fo[s]["test"] - zo[s]["test"] for s in protocol.seeds]
        per = ", ".join(f"s{s} {zo[s]['test']:.3f} vs {fo[s]['test']:.3f}" for s in protocol.seeds)
        zo_mean = statistics.fmean(zo[s]["test"] for s in protocol.seeds)
        test = _mean_sd([zo[s]["test"] for s in protocol.seeds])
        lines += [
            f"Best pure-ZO method on {task}: **{protocol.row(best).label}**, test {test}; gap to FO full of this "
            f"grid {_mean_sd(gaps)} ({per}); gap to the committed FO full {committed:.3f}: "
            f"{committed - zo_mean:.3f} (target ≤ 0.03).",
            "",
        ]
    return lines


def _scan_lines(protocol: Protocol, chosen: dict) -> list[str]:
    if not chosen:
        return []

    def grid_text(factors: Sequence[float]) -> str:
        return "{" + ", ".join(f"{f:g}" for f in factors) + "}"

    own = [f"{t}: × {grid_text(f)}" for t, f in protocol.task_factors.items() if t in protocol.tasks]
    factors = grid_text(protocol.scan_factors) + (f" ({'; '.join(own)})" if own else "")
    lines = [
        f"LR scans (seed {protocol.scan_seed}, {protocol.scan_budget} forwards, lr × {factors}; best dev per lr; "
        "the pick is bold):",
        "",
        "| task | method | best dev by lr | note |",
        "|---|---|---|---|",
    ]
    for (task, row), p in sorted(
        chosen.items(),
        key=lambda kv: (list(protocol.tasks).index(kv[0][0]), [r.name for r in protocol.rows].index(kv[0][1])),
    ):
        cells = " · ".join((f"**{q['lr']:.3g}: {q['best_dev']:.3f}**" if q["lr"] == p["lr"]
                            else f"{q['lr']:.3g}: {q['best_dev']:.3f}") for q in p["grid"])  # fmt: skip
        notes = []
        # only the factors the task's own grid lacks extend it (an extension may already lie in another task's grid)
        added = sorted(set(protocol.row(row).extra_factors) - set(protocol.task_grid(task)))
        if added:
            extra = ", ".join(f"{f:g}" for f in added)
            notes.append(f"grid extended by × {{{extra}}} after a pick on its edge")
        if p["edge"]:
            notes.append("pick on the grid's edge: the best lr may lie outside it")
        if p.get("unstable"):
            notes.append(f"diverged in a seed run at {format_lrs(p)}: the pick is the best lr below (stability rule)")
        if p["lr"] is not None and not p["beats_zero_shot"]:
            notes.append(f"no lr beat zero-shot dev ({p['zero_shot_dev']:.3f})")
        lines.append(f"| {task} | {protocol.row(row).label} | {cells} | {'; '.join(notes) or '—'} |")
    return lines + [""]


def plot_seeds(protocol: Protocol, results: Results) -> list[Path]:
    """``RESULTS/curves-<task>.png`` per task with seed rows: dev accuracy of every seed (thin) and the mean over the
    seeds where all have a point (thick) against forwards (rows evaluated ÷ batch size; left) and against the run's
    wall-clock seconds (right; each method's device in its label, since seconds compare only within a device).
    Needs matplotlib (the ``plot`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ...train.plot import save_png

    written = []
    for task in protocol.tasks:
        rows = {r.name: seed_rows(protocol, results, task, r.name) for r in protocol.rows}
        rows = {k: v for k, v in rows.items() if v}
        if not rows:
            continue
        fig, (ax_f, ax_s) = plt.subplots(1, 2, figsize=(13, 5))
        for i, (name, by_seed) in enumerate(rows.items()):
            colour = f"C{i % 10}"
            devices = sorted({device_type(r.get("device", "?")) for r in by_seed.values()})
            devs = [dict(map(tuple, r["curves"]["dev"])) for r in by_seed.values()]  # forwards → dev accuracy
            for r, dev in zip(by_seed.values(), devs, strict=True):
                secs = dict(map(tuple, r["curves"].get("dev_seconds", [])))
                ax_f.plot(list(dev), list(dev.values()), color=colour, lw=0.6, alpha=0.45)
                pts = [(secs[f], a) for f, a in dev.items() if f in secs]
                ax_s.plot([t for t, _ in pts], [a for _, a in pts], color=colour, lw=0.6, alpha=0.45)
            xs = sorted(set.intersection(*(set(d) for d in devs)))
            mean = [statistics.fmean(d[f] for d in devs) for f in xs]
            label = f"{protocol.row(name).label} ({len(by_seed)} seed{'s' * (len(by_seed) > 1)}, {'/'.join(devices)})"
            ax_f.plot(xs, mean, color=colour, lw=2, marker="o", ms=3, label=label)
        ax_f.set(xlabel=f"forwards (rows evaluated ÷ {protocol.batch_size})", ylabel="dev accuracy",
                 title=f"{task}: dev accuracy per seed (thin) and mean (thick)")  # fmt: skip
        ax_s.set(xlabel="training seconds (device in the legend)", ylabel="dev accuracy",
                 title=f"{task}: dev accuracy against wall-clock")  # fmt: skip
        ax_f.legend(fontsize=7)
        fig.tight_layout()
        written.append(save_png(fig, results.folder / f"curves-{task}.png", dpi=100))
        plt.close(fig)
    return written


def table(results_dir: str | Path, protocol: Protocol = PROTOCOL) -> str:
    """The claims section (``RESULTS/claims.md``, links relative to it) and its figures (:func:`plot_seeds`);
    ValueError on bad results."""
    results = Results.load(results_dir)
    if not results.rows:
        raise ValueError(f"{results_dir}: no rows (runs.jsonl) to make a table of")
    plot_seeds(protocol, results)
    text = "\n".join(claims_section(protocol, results, results_dir)) + "\n"
    atomic_write_text(Path(results_dir) / "claims.md", text)
    return text
